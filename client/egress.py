"""The egress manifest: exactly what the site will send, printed before it connects and enforced.

In single-site mode the site sends only request messages whose fields are a weights
digest and a byte offset (DESIGN.md, "Parties and what crosses between them"), plus its
credentials as call metadata.  :func:`single_site_manifest` declares them;
:func:`render_table` / :meth:`EgressManifest.to_json` show them before any connection;
:class:`EgressGuard` checks every outgoing request against the declaration at run time
and refuses (``PolicyError``) anything undeclared, so a future code path cannot quietly
send more than the user was shown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]  # no stubs in the dev deps yet
from rich.table import Table

from xkt.shared.errors import PolicyError

Recorder = Callable[[str, bytes], None]
"""Called with (method, serialized request) for every request the guard lets through."""


@dataclass(frozen=True)
class DeclaredRequest:
    """One request message the site may send: its RPC, type and every field with its value."""

    method: str
    message_type: str
    fields: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "message_type": self.message_type, "fields": dict(self.fields)}


@dataclass(frozen=True)
class EgressManifest:
    """Everything that may leave the site, for one command; nothing else is sent."""

    mode: str
    requests: tuple[DeclaredRequest, ...]
    metadata: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "requests": [r.to_json() for r in self.requests],
            "metadata": list(self.metadata),
            "site_data": "none",
        }

    def allowed(self, method: str) -> DeclaredRequest | None:
        """The declaration for a full method name (``/pkg.Service/Method``), if any."""
        return next((r for r in self.requests if r.method == method), None)


SOURCE_MODEL = "/xkt.v1.SourceModel/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def single_site_manifest(
    *, sha256: str | None, offset: int | None, token: bool, health: bool = False, batchnorm: bool = False
) -> EgressManifest:
    """The fetch's requests; unknown values (the digest before the manifest arrives) are described."""
    digest = sha256 or "<weights sha256 from the owner's signed manifest>"
    where = str(offset) if offset is not None else "<bytes already held: 0, or the .part size>"
    requests = [
        DeclaredRequest(SOURCE_MODEL + "GetManifest", "xkt.v1.GetManifestRequest"),
        DeclaredRequest(
            SOURCE_MODEL + "FetchWeights", "xkt.v1.FetchWeightsRequest", {"sha256": digest, "offset": where}
        ),
    ]
    if batchnorm:
        requests.append(
            DeclaredRequest(SOURCE_MODEL + "GetBatchNormStats", "xkt.v1.GetBatchNormStatsRequest", {"sha256": digest})
        )
    if health:
        requests.append(
            DeclaredRequest(HEALTH_CHECK, "grpc.health.v1.HealthCheckRequest", {"service": "xkt.v1.SourceModel"})
        )
    metadata = ("authorization: Bearer <token from --token-file / XKT_TOKEN>",) if token else ()
    return EgressManifest("single-site", tuple(requests), metadata)


def render_table(manifest: EgressManifest) -> Table:
    """The manifest as a table for stderr, shown before any connection is made."""
    table = Table("RPC", "message", "fields", title=f"egress manifest ({manifest.mode}): all this command sends")
    for request in manifest.requests:
        fields = ", ".join(f"{k}={v}" for k, v in request.fields.items()) or "(no fields)"
        table.add_row(request.method, request.message_type, fields)
    for item in manifest.metadata:
        table.add_row("(every call)", "metadata", item)
    table.caption = "no site data (images, features, labels, metrics) is sent"
    return table


def check_request(manifest: EgressManifest, method: str, request: Any) -> None:
    """Refuse a request whose RPC, type, fields or concrete field values the manifest does not declare.

    A declared value in angle brackets describes a value known only at run time (an offset).
    """
    declared = manifest.allowed(method)
    type_name = getattr(getattr(request, "DESCRIPTOR", None), "full_name", type(request).__name__)
    if declared is None or declared.message_type != type_name:
        raise _refused(f"{method} with {type_name} is not in the egress manifest")
    for descriptor, value in request.ListFields():
        wanted = declared.fields.get(descriptor.name)
        if wanted is None:
            raise _refused(f"{method} would send the undeclared field {descriptor.name!r}")
        if not wanted.startswith("<") and str(value) != wanted:
            raise _refused(f"{method} would send {descriptor.name}={value!r}, not the declared {wanted!r}")


def _refused(message: str) -> PolicyError:
    return PolicyError(
        f"egress refused: {message}",
        hint="this is an xkt bug (it tried to send more than it declared); nothing was sent, please report it",
        reason="undeclared-egress",
    )


class EgressGuard(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc, unused-ignore]
    """A client interceptor that lets through only declared requests, optionally recording them."""

    def __init__(self, manifest: EgressManifest, recorder: Recorder | None = None) -> None:
        self.manifest = manifest
        self._recorder = recorder

    def _check(self, details: Any, request: Any) -> None:
        method = str(details.method)
        check_request(self.manifest, method, request)
        if self._recorder is not None:
            self._recorder(method, request.SerializeToString())

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self._check(details, request)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self._check(details, request)
        return continuation(details, request)
