"""Site identity: mutual-TLS certificates or per-site bearer tokens stored hashed.

Token file format (``--tokens FILE``), one site per line, ``#`` comments allowed::

    site-a:3b1f...64 hex digits...   # sha256 of the token, never the token itself

A token is shown once, by ``xkt-server tokens add SITE --tokens FILE``, and only its
sha256 is kept, so a leaked token file does not let anyone fetch.  A presented token is
hashed and compared against *every* stored hash with :func:`hmac.compare_digest`, so the
time taken does not reveal which site or prefix matched.

:class:`AuthInterceptor` runs before every RPC except the health service (probes carry
no credentials): a verified client certificate (the TLS layer already checked it
against the owner's CA) names the site by its common name, else a valid
``authorization: Bearer <token>`` does; anything else is aborted UNAUTHENTICATED with a
fixed message.  A certificate revoked with ``xkt-server provision revoke`` gets its own
message and the trailer ``xkt-reason: certificate-revoked``, so the site is told to ask
for a new kit instead of retrying.  The identity is available to the servicer via
:func:`current_site`.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]  # no stubs in the dev deps yet

from xkt.shared.errors import ConfigError
from xkt.shared.grpc_options import AUTH_METADATA_KEY
from xkt.shared.tls import REASON_METADATA_KEY, REVOKED_REASON, peer_cert_from_auth_context, site_id_from_cert

logger = logging.getLogger("xkt")

SITE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_EXEMPT_PREFIX = "/grpc.health.v1.Health/"
ANONYMOUS = "anonymous"
UNAUTHENTICATED_MESSAGE = "authentication required: present a site certificate or a valid bearer token"
REVOKED_MESSAGE = "site certificate revoked by the owner"

_current_site: contextvars.ContextVar[str] = contextvars.ContextVar("xkt_site", default=ANONYMOUS)


def current_site() -> str:
    """Identity of the site whose RPC this thread is serving (``anonymous`` if none)."""
    return _current_site.get()


def hash_token(token: str) -> str:
    """sha256 hex of a token: what the token file stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------ the token file


@dataclass(frozen=True)
class TokenStore:
    """Site id → sha256 of its token."""

    hashes: dict[str, str]

    def identify(self, token: str) -> str | None:
        """The site whose stored hash matches ``token``; constant work whichever matches."""
        presented = hash_token(token).encode("ascii")
        found = None
        for site, stored in self.hashes.items():
            if hmac.compare_digest(presented, stored.encode("ascii")):
                found = site
        return found


def _token_file_error(path: Path, message: str) -> ConfigError:
    return ConfigError(
        f"token file {path}: {message}",
        hint="each line must read SITE_ID:SHA256_HEX; create entries with `xkt-server tokens add SITE --tokens FILE`",
        reason="bad-token-file",
    )


def parse_tokens(text: str, path: Path) -> TokenStore:
    """Parse the token file strictly: a malformed line is an error, never skipped."""
    hashes: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        site, sep, digest = (part.strip() for part in line.partition(":"))
        if not sep or not SITE_ID_RE.fullmatch(site) or not _HASH_RE.fullmatch(digest):
            raise _token_file_error(path, f"line {number} is not SITE_ID:SHA256_HEX")
        if site in hashes:
            raise _token_file_error(path, f"line {number} repeats site {site!r}")
        hashes[site] = digest
    return TokenStore(hashes)


def load_tokens(path: Path) -> TokenStore:
    """Read ``path`` (see the module docstring for the format)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _token_file_error(path, f"cannot be read ({exc.__class__.__name__})") from None
    return parse_tokens(text, path)


def add_token(path: Path, site: str) -> str:
    """Create a random token for ``site``, append its hash to ``path`` (mode 0600), return the token."""
    if not SITE_ID_RE.fullmatch(site):
        raise ConfigError(
            f"site id {site!r} is not valid",
            hint="use 1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit",
            reason="bad-site-id",
        )
    path = Path(path)
    store = load_tokens(path) if path.exists() else TokenStore({})
    if site in store.hashes:
        raise ConfigError(
            f"site {site!r} already has a token in {path}",
            hint="remove its line from the file first to rotate the token",
            reason="site-exists",
        )
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{site}:{hash_token(token)}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


# ------------------------------------------------------------------ the interceptor


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


def certificate_identity(auth_context: Mapping[str, Any], revoked: frozenset[int] = frozenset()) -> str | None:
    """The site a verified client certificate proves, or None (no certificate, or revoked).

    gRPC verifies the chain but has no CRL hook, so the revocation list written by
    ``xkt-server provision revoke`` is checked here against the certificate's serial.
    Identity is the ``xkt://site/<id>`` URI SAN of provisioned kits; certificates from
    another issuer that lack it fall back to the common name, else the first SAN.
    """
    cert = peer_cert_from_auth_context(auth_context)
    if cert is not None and cert.serial_number in revoked:
        return None
    site = site_id_from_cert(cert) if cert is not None else None
    if site is not None:
        return site
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = auth_context.get(key) or []
        if values and isinstance(values[0], bytes):
            return values[0].decode("utf-8", "replace")
    return None


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc, unused-ignore]
    """Authenticate every RPC (health excepted) by client certificate or bearer token.

    The check runs inside the wrapped handler, where the servicer context (and with it
    the TLS peer certificate) is available; interceptors alone only see metadata.
    """

    def __init__(
        self,
        tokens: TokenStore | None,
        *,
        mtls: bool,
        allow_anonymous: bool = False,
        on_refused: Callable[[str], None] | None = None,
        revoked: frozenset[int] = frozenset(),
    ) -> None:
        self._tokens = tokens
        self._mtls = mtls
        self._revoked = revoked
        self._allow_anonymous = allow_anonymous
        self._on_refused = on_refused

    def identify(self, context: grpc.ServicerContext) -> str | None:
        """The site calling, or None if it proved no identity."""
        if self._mtls:
            site = certificate_identity(context.auth_context(), self._revoked)
            if site is not None:
                return site
        token = _bearer(context.invocation_metadata())
        if token is not None and self._tokens is not None:
            return self._tokens.identify(token)
        return ANONYMOUS if self._allow_anonymous else None

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        method = str(handler_call_details.method)
        if handler is None or method.startswith(_EXEMPT_PREFIX):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # the contract has no client-streaming RPCs; nothing else to wrap

    def _presented_revoked(self, context: grpc.ServicerContext) -> bool:
        """Did the caller present a chain-verified certificate that ``provision revoke`` revoked?"""
        if not self._mtls or not self._revoked:
            return False
        cert = peer_cert_from_auth_context(context.auth_context())
        return cert is not None and cert.serial_number in self._revoked

    def _authenticate(self, context: grpc.ServicerContext, method: str) -> str:
        site = self.identify(context)
        if site is None:
            revoked = self._presented_revoked(context)
            logger.warning(
                "refused %s call to %s from %s", "revoked" if revoked else "unauthenticated", method, context.peer()
            )
            if self._on_refused is not None:
                self._on_refused(method)
            if revoked:  # the site may know: it tells the site to ask for a new kit rather than retry
                context.set_trailing_metadata(((REASON_METADATA_KEY, REVOKED_REASON),))
                context.abort(grpc.StatusCode.UNAUTHENTICATED, REVOKED_MESSAGE)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
            raise AssertionError("context.abort returned")  # abort always raises
        return site

    def _wrap_unary(self, inner: Callable[[Any, Any], Any], method: str) -> Callable[[Any, Any], Any]:
        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            token = _current_site.set(self._authenticate(context, method))
            try:
                return inner(request, context)
            finally:
                _current_site.reset(token)

        return behaviour

    def _wrap_stream(self, inner: Callable[[Any, Any], Any], method: str) -> Callable[[Any, Any], Iterator[Any]]:
        def behaviour(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            site = self._authenticate(context, method)
            return _with_site(site, lambda: inner(request, context))

        return behaviour


def _with_site(site: str, start: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """Produce a response stream with :func:`current_site` set around each step.

    The variable is set and reset inside every ``next()`` (and the final ``close()``), so
    it never leaks into another RPC on the same pool thread, whichever thread resumes us.
    """
    token = _current_site.set(site)
    try:
        iterator = iter(start())
    finally:
        _current_site.reset(token)
    try:
        while True:
            token = _current_site.set(site)
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                _current_site.reset(token)
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            token = _current_site.set(site)
            try:
                close()
            finally:
                _current_site.reset(token)
