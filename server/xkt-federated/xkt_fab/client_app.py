"""The site's ClientApp: xkt.client.federated_client, from the site's own xkt install."""

from xkt.client.federated_client import app

__all__ = ["app"]
