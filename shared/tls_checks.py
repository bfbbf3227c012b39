"""What is wrong with a TLS certificate or key, in words a person can act on.

gRPC (BoringSSL) refuses a bad certificate with one opaque line ("handshake failed",
"CERTIFICATE_VERIFY_FAILED") that does not say *why*.  xkt therefore checks what it can
itself, with the same rules the handshake applies, and names the cause:

* :func:`load_tls_identity` and :func:`load_trust_anchors` are how the server and the
  client load their own certificate + key and the CA they trust: an expired or
  not-yet-valid certificate, a weak key or a key that does not belong to the certificate
  is refused before any socket is opened (:class:`~xkt.shared.errors.ConfigError`, exit 3).
* :func:`diagnose_server_certificate` explains, after a failed handshake, what is wrong
  with the certificate a server presented (unknown CA, expired, not yet valid, a name
  that does not match, a weak key); :func:`diagnose_client_certificate` does the same
  for our own certificate when the server refused it.

What "weak" means for xkt
    RSA keys shorter than :data:`MIN_RSA_BITS` (2048, NIST SP 800-131A's floor since
    2014), elliptic curves other than P-256/P-384/P-521 (P-192 and P-224 give under 128
    bits of security, and gRPC refuses other curves anyway), DSA keys, and certificates
    signed with MD5 or SHA-1.  ``xkt-server provision`` writes P-256 only, so this bars
    only hand-made or imported material.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from xkt.shared.errors import ConfigError
from xkt.shared.tls import read_pem_bytes

MIN_RSA_BITS = 2048
STRONG_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
WEAK_SIGNATURE_HASHES = frozenset({"md5", "sha1"})


# ------------------------------------------------------------------ pure checks


def key_weakness(key: PublicKeyTypes) -> str | None:
    """Why ``key`` is too weak for xkt's TLS (see the module docstring), or None when it is strong enough."""
    if isinstance(key, rsa.RSAPublicKey):
        return None if key.key_size >= MIN_RSA_BITS else f"RSA-{key.key_size} (xkt needs at least {MIN_RSA_BITS} bits)"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return (
            None if key.curve.name in STRONG_CURVES else f"elliptic curve {key.curve.name} (xkt needs P-256 or larger)"
        )
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return None
    return f"{type(key).__name__.removeprefix('_')} keys are not accepted (use EC P-256 or RSA-{MIN_RSA_BITS}+)"


def certificate_weakness(cert: x509.Certificate) -> str | None:
    """A weak key or an MD5/SHA-1 signature on ``cert``, described; None when neither."""
    weakness = key_weakness(cert.public_key())
    if weakness is not None:
        return f"weak key: {weakness}"
    algorithm = cert.signature_hash_algorithm
    if algorithm is not None and algorithm.name in WEAK_SIGNATURE_HASHES:
        return f"weak signature: signed with {algorithm.name.upper()}"
    return None


def validity_problem(cert: x509.Certificate, now: dt.datetime | None = None) -> tuple[str, str] | None:
    """("expired" | "not-yet-valid", words) when ``now`` lies outside the certificate's validity."""
    now = now or dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        return "expired", f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if now < cert.not_valid_before_utc:
        return "not-yet-valid", f"not yet valid: valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return None


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True when ``ca``'s key signed ``cert`` (and the names chain)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def certificate_names(cert: x509.Certificate) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """(DNS names, IP addresses) the certificate is valid for: its SANs, else its common name as gRPC does."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        return names, []
    ips = [
        ip
        for ip in sans.get_values_for_type(x509.IPAddress)
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    ]
    return list(sans.get_values_for_type(x509.DNSName)), ips


def name_matches(cert: x509.Certificate, name: str) -> bool:
    """Does ``cert`` cover the host ``name`` (an IP literal against IP SANs, else DNS names, ``*.`` wildcards)?"""
    dns, ips = certificate_names(cert)
    try:
        return ipaddress.ip_address(name.strip("[]")) in ips
    except ValueError:
        pass
    wanted = name.lower().rstrip(".")
    for pattern in (d.lower().rstrip(".") for d in dns):
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def describe_names(cert: x509.Certificate) -> str:
    dns, ips = certificate_names(cert)
    listed = [f"DNS:{d}" for d in dns] + [f"IP:{ip}" for ip in ips]
    return ", ".join(listed) or "no names"


def diagnose_server_certificate(
    cert: x509.Certificate, trusted: Sequence[x509.Certificate], name: str, now: dt.datetime | None = None
) -> tuple[str, str] | None:
    """(reason, message) for the first thing a TLS client refuses in a server's ``cert``; None if nothing.

    The order is the handshake's: the issuer first (an untrusted certificate's dates and
    names mean nothing), then the dates, the name dialled, and the key's strength.
    """
    subject = cert.subject.rfc4514_string()
    if not any(issued_by(cert, ca) for ca in trusted):
        return "tls-untrusted-server", (
            f"the server's certificate ({subject}) is issued by {cert.issuer.rfc4514_string()}, "
            "which is not the trusted CA (unknown CA: untrusted server CA)"
        )
    problem = validity_problem(cert, now)
    if problem is not None:
        kind, words = problem
        return f"tls-server-cert-{kind}", f"the server's certificate ({subject}) {words}"
    if not name_matches(cert, name):
        return "tls-hostname-mismatch", (
            f"the name {name!r} does not match the server's certificate, which is valid for "
            f"{describe_names(cert)} only (hostname mismatch)"
        )
    weakness = certificate_weakness(cert)
    if weakness is not None:
        return "tls-server-weak-key", f"the server's certificate ({subject}) has a {weakness}"
    return None


def diagnose_client_certificate(
    cert: x509.Certificate, trusted: Sequence[x509.Certificate], now: dt.datetime | None = None
) -> str | None:
    """Why an owner's server would refuse our client ``cert`` (its CA is the owner CA we trust), or None."""
    if not any(issued_by(cert, ca) for ca in trusted):
        return (
            f"our client certificate is issued by {cert.issuer.rfc4514_string()}, not by the owner's CA "
            "(unknown CA to the server)"
        )
    problem = validity_problem(cert, now)
    if problem is not None:
        return f"our client certificate {problem[1]}"
    return None


# ------------------------------------------------------------------ loading with the checks


def _certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(
            f"{what} file {path} holds no PEM X.509 certificate",
            hint="pass a .crt file written by `xkt-server provision` (-----BEGIN CERTIFICATE-----)",
            reason="not-a-certificate",
        )
    return certs


def check_certificate(cert: x509.Certificate, path: Path, *, what: str, now: dt.datetime | None = None) -> None:
    """Refuse an expired, not-yet-valid or weak certificate with a ConfigError that names the cause."""
    problem = validity_problem(cert, now)
    if problem is not None:
        kind, words = problem
        hint = (
            "check this machine's clock (NTP); if it is right, use a certificate that is valid now"
            if kind == "not-yet-valid"
            else "issue a new one (`xkt-server provision` re-issues server certificates and site kits)"
        )
        raise ConfigError(f"{what} {path} {words}", hint=hint, reason=f"cert-{kind}")
    weakness = certificate_weakness(cert)
    if weakness is not None:
        raise ConfigError(
            f"{what} {path} has a {weakness}",
            hint=f"issue a new one with an EC P-256 or RSA-{MIN_RSA_BITS}+ key and SHA-256 (`xkt-server provision`)",
            reason="weak-key",
        )


def load_trust_anchors(path: Path, *, what: str = "CA certificate", now: dt.datetime | None = None) -> bytes:
    """The PEM bytes of the CA file, once every certificate in it is valid now and strong enough."""
    data = read_pem_bytes(Path(path), what=what)
    for cert in _certificates(data, Path(path), what):
        check_certificate(cert, Path(path), what=what, now=now)
    return data


def trusted_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a CA file (no checks: for explaining a failure, not for trusting)."""
    return _certificates(read_pem_bytes(Path(path), what="CA certificate"), Path(path), "CA certificate")


def load_tls_identity(
    cert_path: Path, key_path: Path, *, what: str, private: bool = True, now: dt.datetime | None = None
) -> tuple[bytes, bytes]:
    """(certificate chain PEM, key PEM) after checking the leaf's dates and strength and that the key is its own.

    ``private`` also refuses a key file that other users can read (the client's rule; the
    server keeps its older behaviour of leaving file modes to the operator).
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    chain = read_pem_bytes(cert_path, what=what)
    leaf = _certificates(chain, cert_path, what)[0]
    check_certificate(leaf, cert_path, what=what, now=now)
    key_pem = read_pem_bytes(key_path, what=f"{what} key", private=private)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{key_path} is not an unencrypted PEM private key",
            hint="pass the .key file written by `xkt-server provision` or `xkt-client csr`",
            reason="bad-key-format",
        ) from None
    public = key.public_key()
    weakness = key_weakness(public)
    if weakness is not None:
        raise ConfigError(
            f"{what} key {key_path} is weak: {weakness}",
            hint=f"make a new key (EC P-256 or RSA-{MIN_RSA_BITS}+) and have its certificate issued again",
            reason="weak-key",
        )
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if public.public_bytes(*raw) != leaf.public_key().public_bytes(*raw):
        raise ConfigError(
            f"{what} key {key_path} does not belong to the certificate {cert_path}",
            hint="pass the key that was made together with this certificate (site.key beside site.crt)",
            reason="key-cert-mismatch",
        )
    return chain, key_pem
