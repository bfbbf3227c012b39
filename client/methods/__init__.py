"""Adaptation methods, by registry name (``xkt-client adapt --method NAME``).

Importing this package registers every built-in method; ``METHODS`` maps names to
classes and :func:`get_method` refuses unknown names with the list of choices.
"""

from __future__ import annotations

from xkt.client.methods import cmcd, shot, socket, source_only, tgmb_tgkt
from xkt.client.methods.base import METHODS, Batch, Method, MethodConfig, get_method, register

__all__ = [
    "METHODS",
    "Batch",
    "Method",
    "MethodConfig",
    "get_method",
    "register",
    "cmcd",
    "shot",
    "socket",
    "source_only",
    "tgmb_tgkt",
]
