"""Why a TLS handshake with an owner's server failed, found out after the fact.

gRPC reports every handshake failure in much the same words ("handshake failed",
"CERTIFICATE_VERIFY_FAILED", "socket closed"), whatever the cause.  When a call fails
that way, :func:`explain_handshake_failure` opens one more connection of its own
(bounded by ``timeout_s``, no application data: a ClientHello and nothing after the
handshake) and looks at what the server answers:

* no TLS record at all: the server speaks plaintext (it was started with ``--insecure``);
* a certificate: it is checked with the rules of the real handshake
  (:func:`xkt.shared.tls_checks.diagnose_server_certificate`): unknown CA, expired, not
  yet valid, a name that does not match, a weak key;
* a good certificate while we presented our own: the server refused ours, and
  :func:`~xkt.shared.tls_checks.diagnose_client_certificate` says what is wrong with it.

The probe verifies nothing and trusts nothing it reads: it only chooses the words of an
error that is raised anyway.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from xkt.shared.addresses import split_address
from xkt.shared.errors import XktError
from xkt.shared.tls_checks import diagnose_client_certificate, diagnose_server_certificate, trusted_certificates

PROBE_TIMEOUT_S = 5.0
_TLS_RECORD_TYPES = frozenset({0x14, 0x15, 0x16, 0x17})  # change_cipher_spec, alert, handshake, application_data


@dataclass(frozen=True)
class Probe:
    """What one handshake attempt saw: ``plaintext`` (no TLS answer), or the server's certificate (maybe None)."""

    plaintext: bool
    certificate: x509.Certificate | None


def _looks_like_tls(data: bytes) -> bool:
    """A TLS record starts with its content type and major version 3; HTTP/2 frames do not."""
    return len(data) >= 2 and data[0] in _TLS_RECORD_TYPES and data[1] == 0x03


def probe_server(host: str, port: int, server_name: str, timeout_s: float = PROBE_TIMEOUT_S) -> Probe | None:
    """Handshake without verification to read the server's certificate; None if the server could not be reached."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sni = None if _is_ip(server_name) else server_name
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            first = True
            while time.monotonic() < deadline:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    raw.settimeout(max(0.1, deadline - time.monotonic()))
                    data = raw.recv(65536)
                    if first and not _looks_like_tls(data):
                        return Probe(plaintext=True, certificate=None)  # closed or answered in something else
                    first = False
                    if not data:
                        break
                    incoming.write(data)
                except ssl.SSLError:
                    break  # an alert after the certificate arrived (e.g. our missing client certificate)
            if pending := outgoing.read():
                raw.sendall(pending)
    except OSError:
        return None
    der = tls.getpeercert(binary_form=True)
    return Probe(plaintext=False, certificate=x509.load_der_x509_certificate(der) if der else None)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def explain_handshake_failure(
    server: str,
    *,
    server_name: str | None,
    ca_cert: Path | None,
    client_cert: Path | None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> tuple[str, str, str] | None:
    """(message, hint, reason) naming why a TLS client could not talk to ``server``; None if the probe cannot tell."""
    host, port = split_address(server, option="--server", example="owner.example.org:50051")
    name = server_name or host
    probe = probe_server(host, port, name, timeout_s)
    if probe is None:
        return None
    if probe.plaintext:
        return (
            "the server speaks plaintext, not TLS (it answered the TLS handshake with no TLS record)",
            "the owner serves with --insecure: ask for a TLS server, or use --insecure yourself on loopback only",
            "tls-server-plaintext",
        )
    if probe.certificate is None or ca_cert is None:
        return None
    try:
        trusted = trusted_certificates(ca_cert)
    except XktError:
        return None
    found = diagnose_server_certificate(probe.certificate, trusted, name)
    if found is not None:
        reason, message = found
        return message, _SERVER_HINTS.get(reason, "tell the owner what the message says"), reason
    if client_cert is not None:
        try:
            ours = trusted_certificates(client_cert)[0]
        except XktError:
            return None
        problem = diagnose_client_certificate(ours, trusted)
        if problem is not None:
            return (
                f"the server refused our client certificate during the TLS handshake: {problem}",
                "use the site kit issued by this server's owner (--kit DIR); ask the owner to re-issue it if expired",
                "tls-client-cert-refused",
            )
    return None


_SERVER_HINTS = {
    "tls-untrusted-server": "pass the owner's ca.crt with --ca-cert (or --kit); check that you dial the right server",
    "tls-server-cert-expired": "the owner must renew the server certificate (`xkt-server provision`) and restart",
    "tls-server-cert-not-yet-valid": "check the clocks of this machine and the server (NTP); or wait until it is valid",
    "tls-hostname-mismatch": "dial a name the certificate lists, or pass --server-name NAME that it lists",
    "tls-server-weak-key": "the owner must re-issue the server certificate with an EC P-256 or RSA-2048+ key",
}
