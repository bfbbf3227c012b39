"""TLS files shared by the owner's server and the sites: read, check, describe.

The owner's PKI (``xkt-server provision``) and a site's CSR (``xkt-client csr``) write
PEM files; the server and client load them here before handing the bytes to gRPC.  gRPC's
own errors for a bad certificate are opaque ("handshake failed"), so every file is checked
first and a problem becomes a :class:`~xkt.shared.errors.ConfigError` (exit 3) naming the
file and the fix: missing, unreadable, not a regular file, not PEM, or a private key that
other users can read (the same discipline as :mod:`xkt.shared.signing`).

Site identity
    A site certificate carries the site id twice: as the subject common name and as the
    URI subject alternative name ``xkt://site/<site_id>``.  The server treats the **URI SAN**
    as the identity (see :func:`site_id_from_cert`) and refuses a certificate whose CN
    disagrees with it; the CN is there for humans and tools that only show the subject.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from xkt.shared.errors import ConfigError
from xkt.shared.files import FileReasons, read_bounded_file, refuse_shared_mode

MAX_PEM_BYTES = 256 * 1024
"""A certificate or key is a few kilobytes; a CA bundle perhaps tens. More is not a PEM file we wrote."""

SITE_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
"""Site ids are DNS-label-like: safe as folder names, in URIs and in log lines."""

SITE_URI_PREFIX = "xkt://site/"
"""A site certificate's URI SAN is this prefix plus the site id: the identity the server trusts."""

REASON_METADATA_KEY = "xkt-reason"
"""Trailing metadata a server attaches to a refusal: a fixed slug, so a client need not parse messages."""

REVOKED_REASON = "certificate-revoked"
"""The slug of a refusal because ``xkt-server provision revoke`` revoked the site's certificate."""

_PEM_MARKER = b"-----BEGIN "
TLS_FILE_REASONS = FileReasons("tls-file-not-found", "tls-file-unreadable", "tls-not-a-file", "tls-file-too-large")


def validate_site_id(site_id: str) -> str:
    """Return ``site_id`` if it matches :data:`SITE_ID_PATTERN`; else raise ConfigError.

    The id becomes a folder name and part of a URI, so anything outside the pattern
    (upper case, dots, slashes, ``..``) is refused rather than escaped.
    """
    if not isinstance(site_id, str) or SITE_ID_PATTERN.fullmatch(site_id) is None:
        raise ConfigError(
            f"invalid site id {site_id!r}",
            hint="use 1-63 characters of lowercase letters, digits and '-', starting with a letter or digit",
            reason="bad-site-id",
        )
    return site_id


def site_uri(site_id: str) -> str:
    """The URI SAN that names ``site_id`` in its certificate."""
    return SITE_URI_PREFIX + validate_site_id(site_id)


# ------------------------------------------------------------------ reading files


def read_pem_bytes(path: Path, *, what: str = "certificate", private: bool = False) -> bytes:
    """Read a small PEM file, refusing anything that is not one; ``private`` also checks the mode."""
    data = read_bounded_file(
        Path(path),
        what=what,
        limit=MAX_PEM_BYTES,
        private=private,
        reasons=TLS_FILE_REASONS,
        missing_hint="check the path; `xkt-server provision` writes the PKI and the site kits",
    )
    if _PEM_MARKER not in data:
        raise ConfigError(
            f"{what} file {path} is not PEM text (no '-----BEGIN' line)",
            hint="convert DER with `openssl x509 -inform der -in FILE -out FILE.pem`, or pass the .crt/.key xkt wrote",
            reason="not-pem",
        )
    return data


def check_key_permissions(path: Path) -> None:
    """Raise ConfigError unless ``path`` is a regular file that only its owner can access.

    Call this before handing a key path to a library that reads it itself; when xkt
    reads the key, :func:`read_pem_bytes` with ``private=True`` checks the same thing.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(
            f"private key file {path} does not exist",
            hint="check the path; a site kit holds site.key next to site.crt",
            reason="tls-file-not-found",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot stat private key file {path}: {exc.strerror}",
            hint="check the path and that this user may read it",
            reason="tls-file-unreadable",
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(
            f"private key file {path} is not a regular file",
            hint="pass the path of the PEM key file itself",
            reason="tls-not-a-file",
        )
    refuse_shared_mode(path, info.st_mode)


def load_cert(path: Path) -> x509.Certificate:
    """Load one PEM certificate (the first in the file), with a clear error for anything else."""
    path = Path(path)
    data = read_pem_bytes(path, what="certificate")
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(
            f"{path} holds a private key, not a certificate",
            hint="pass the .crt file; keep .key files out of certificate paths",
            reason="private-key-given",
        )
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(
            f"{path} is not a PEM X.509 certificate",
            hint="pass a .crt file written by `xkt-server provision` (-----BEGIN CERTIFICATE-----)",
            reason="not-a-certificate",
        ) from None


def load_private_key(path: Path) -> PrivateKeyTypes:
    """Load an unencrypted PEM private key that only its owner can read.

    TLS keys are unencrypted because gRPC takes the key bytes as they are; the 0600 mode
    (set at creation) is what protects them.
    """
    path = Path(path)
    data = read_pem_bytes(path, what="private key", private=True)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{path} is not an unencrypted PEM private key",
            hint="pass the .key file written by `xkt-server provision` or `xkt-client csr`",
            reason="bad-key-format",
        ) from None


# ------------------------------------------------------------- describing certs


def cert_fingerprint(cert: x509.Certificate) -> str:
    """``"sha256:" + sha256(DER).hex()``: the value kit.json, logs and `doctor` show."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class CertInfo:
    """What a person needs to tell certificates apart in an error message or `doctor`."""

    subject: str
    issuer: str
    serial: int
    sans: tuple[str, ...]
    not_before: str
    not_after: str
    fingerprint: str

    def line(self) -> str:
        """One line, e.g. ``CN=site-a [URI:xkt://site/site-a] valid 2025-01-01..2026-01-01``."""
        sans = ", ".join(self.sans) or "no SANs"
        return f"{self.subject} [{sans}] valid {self.not_before}..{self.not_after} ({self.fingerprint[:19]}…)"

    def to_json(self) -> dict[str, object]:
        """The description for ``--json`` output; the serial as hex so no reader loses bits."""
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": format(self.serial, "x"),
            "sans": list(self.sans),
            "not_before": self.not_before,
            "not_after": self.not_after,
            "fingerprint": self.fingerprint,
        }


def describe_cert(cert: x509.Certificate) -> CertInfo:
    """Subject, issuer, serial, SANs (``DNS:``/``IP:``/``URI:``), validity and fingerprint."""
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        sans=tuple(_san_strings(cert)),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        fingerprint=cert_fingerprint(cert),
    )


def _san_strings(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = [f"DNS:{name}" for name in sans.get_values_for_type(x509.DNSName)]
    out += [f"IP:{ip}" for ip in sans.get_values_for_type(x509.IPAddress)]
    out += [f"URI:{uri}" for uri in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    return out


# ------------------------------------------------------------------ site identity


def site_id_from_cert(cert: x509.Certificate) -> str | None:
    """The site id a (chain-verified) site certificate names, or None if it names none.

    Identity is the single URI SAN ``xkt://site/<id>``; the subject CN must equal the
    same id.  Two site URIs, a malformed id or a disagreeing CN all give None, so a caller
    that requires an identity fails closed.
    """
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(SITE_URI_PREFIX)]
    if len(uris) != 1:
        return None
    site_id = uris[0][len(SITE_URI_PREFIX) :]
    if SITE_ID_PATTERN.fullmatch(site_id) is None:
        return None
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) != 1 or common_names[0].value != site_id:
        return None
    return site_id


def peer_cert_from_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> x509.Certificate | None:
    """The client certificate of a gRPC call, from ``ServicerContext.auth_context()``.

    gRPC Python verifies the chain but offers no CRL or identity hook, so the server
    takes the verified peer certificate from here, checks its serial against
    ``xkt.server.provision.load_revoked`` and reads the site id with
    :func:`site_id_from_cert`.  None when the peer sent no certificate.
    """
    pems = auth_context.get("x509_pem_cert") or []
    if len(pems) != 1:
        return None
    try:
        return x509.load_pem_x509_certificate(bytes(pems[0]))
    except ValueError:
        return None
