"""The owner's ServerApp: xkt.server.federated_server, from the owner's own xkt install."""

from xkt.server.federated_server import app

__all__ = ["app"]
