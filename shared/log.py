"""Human output on stderr (rich), machine output on stdout, and one ``xkt`` logger.

Progress bars and tables are for people, so they go to stderr and disappear off a TTY;
``--json`` results are for programs, so exactly one JSON object goes to stdout.
Nothing here ever logs tensors, file contents, tokens or keys.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOGGER_NAME = "xkt"
logger = logging.getLogger(LOGGER_NAME)


def stderr_console() -> Console:
    """A console on stderr that honours NO_COLOR and TERM=dumb."""
    no_color = bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"
    return Console(stderr=True, no_color=no_color, highlight=False, soft_wrap=True)


def setup_logging(verbosity: int = 0) -> None:
    """Route the ``xkt`` logger to stderr: -q → warnings only, default → info, -v → debug."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    log = logging.getLogger(LOGGER_NAME)
    log.handlers.clear()
    handler = RichHandler(console=stderr_console(), show_path=False, show_time=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def emit_json(result: dict[str, Any]) -> None:
    """Print one JSON object on stdout: the machine-readable result of a command."""
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A rich progress bar on stderr; silent when stderr is not a terminal or ``enabled`` is false."""
    console = stderr_console()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=False,
    )
    with progress:
        yield progress
