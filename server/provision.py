"""The owner's small PKI: a CA, the server's certificate and one kit per site.

Layout of a PKI folder (``xkt-server provision init --out PKI``)::

    PKI/ca.crt  ca.key (0600)            the owner CA; ca.key never leaves this folder
    PKI/server.crt  server.key (0600)    what `xkt-server serve` presents (serverAuth)
    PKI/index.json                       every site certificate issued (append-only)
    PKI/revoked.json                     revoked site serials (see below)
    PKI/sites/<id>/site.crt  ca.crt  kit.json  [site.key (0600), only for add-site]

Two ways to enrol a site, after NVFlare's kits and OpenFL's CSR flow:

* :func:`add_site` makes the whole kit, private key included; the owner ships the folder
  to the site over a channel it trusts.
* :func:`sign_csr` signs a request from ``xkt-client csr``; the site's key never leaves
  the site and the kit holds only public material.

Adding a site writes only ``sites/<id>/`` and ``index.json``: the CA and other kits stay
byte-identical, so no one else is re-provisioned.  All keys are ECDSA P-256 and all
signatures ECDSA with SHA-256, which gRPC (BoringSSL) accepts everywhere.

Revocation
    gRPC Python has no CRL hook: ``ssl_server_credentials`` verifies the chain but cannot be
    told that a certificate was revoked.  So :func:`revoke_site` records the serial in
    ``revoked.json`` and the server must check each call's peer certificate itself
    (``xkt.shared.tls.peer_cert_from_auth_context``) against :func:`load_revoked`, and
    refuse with UNAUTHENTICATED.  The identity it uses is the URI SAN
    ``xkt://site/<id>`` (``xkt.shared.tls.site_id_from_cert``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xkt.shared.errors import ConfigError
from xkt.shared.files import replace_file, write_new_file
from xkt.shared.signing import strict_json_loads
from xkt.shared.tls import (
    cert_fingerprint,
    load_cert,
    load_private_key,
    read_pem_bytes,
    site_uri,
    validate_site_id,
)

CA_DAYS = 3650
SERVER_DAYS = 825
SITE_DAYS = 365
BACKDATE = dt.timedelta(minutes=5)
"""Certificates start a little in the past so a peer whose clock is slightly behind accepts them."""

_DNS_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
_MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class PkiPaths:
    """Where the files of one PKI folder live."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    index: Path
    revoked: Path
    sites: Path

    @classmethod
    def of(cls, pki_dir: Path) -> PkiPaths:
        """The paths inside ``pki_dir`` (nothing is read or created)."""
        root = Path(pki_dir)
        return cls(
            root=root,
            ca_cert=root / "ca.crt",
            ca_key=root / "ca.key",
            server_cert=root / "server.crt",
            server_key=root / "server.key",
            index=root / "index.json",
            revoked=root / "revoked.json",
            sites=root / "sites",
        )


# ---------------------------------------------------------------------- init


def init_pki(
    pki_dir: Path,
    *,
    ca_name: str = "xkt owner CA",
    server_names: Sequence[str] = ("localhost",),
    server_ips: Sequence[str] = ("127.0.0.1",),
    days: int = SERVER_DAYS,
    ca_days: int = CA_DAYS,
) -> PkiPaths:
    """Create the CA and the server certificate in a new PKI folder; never overwrite one.

    127.0.0.1 and localhost are always among the server's SANs, so a local server and client
    work out of the box and the fleet proxy can verify the SuperLink it forwards to (it dials
    localhost); a remote server needs its real DNS name or IP (clients check it).
    """
    paths = PkiPaths.of(pki_dir)
    names, ips = _check_server_names(server_names), _check_server_ips(server_ips)
    _check_days(days, ca_days)
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    if existing or paths.index.exists():
        raise ConfigError(
            f"a PKI already exists in {paths.root} ({(existing or [paths.index])[0].name})",
            hint="choose a new --out folder; re-creating the CA would invalidate every site kit",
            reason="pki-exists",
        )
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = (
        _base_builder(ca_subject, ca_subject, ca_key.public_key(), now, now + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_new_file(paths.ca_key, _key_pem(ca_key), mode=0o600)
    write_new_file(paths.ca_cert, _cert_pem(ca_cert), mode=0o644)
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names] + [x509.IPAddress(ip) for ip in ips]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else str(ips[0]))])
    server_cert = _issue_leaf(ca_cert, ca_key, subject, server_key.public_key(), sans, server=True, days=days)
    write_new_file(paths.server_key, _key_pem(server_key), mode=0o600)
    write_new_file(paths.server_cert, _cert_pem(server_cert), mode=0o644)
    write_new_file(paths.index, _json_bytes({"schema_version": 1, "sites": []}), mode=0o644)
    return paths


def _check_server_names(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        lowered = name.strip().lower().rstrip(".")
        if _DNS_NAME.fullmatch(lowered) is None:
            raise ConfigError(
                f"invalid server name {name!r}",
                hint="give the DNS name clients dial (e.g. owner.example.org); use --server-ip for addresses",
                reason="bad-server-name",
            )
        if lowered not in out:
            out.append(lowered)
    if "localhost" not in out:  # the fleet proxy dials the owner's own SuperLink as localhost
        out.append("localhost")
    return out


def _check_server_ips(ips: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = [ipaddress.ip_address("127.0.0.1")]
    for value in ips:
        try:
            ip = ipaddress.ip_address(value.strip())
        except ValueError:
            raise ConfigError(
                f"invalid server IP {value!r}",
                hint="give an IPv4 or IPv6 address, e.g. 10.0.0.5; use --server-name for DNS names",
                reason="bad-server-ip",
            ) from None
        if ip not in out:
            out.append(ip)
    return out


def _check_days(*values: int) -> None:
    for days in values:
        if not 1 <= days <= 36500:
            raise ConfigError(
                f"validity of {days} days is out of range",
                hint="give between 1 and 36500 days",
                reason="bad-days",
            )


# ---------------------------------------------------------------- certificates


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _base_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificateIssuerPublicKeyTypes,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    """Subject, issuer, key, a random 159-bit serial, and a validity backdated by BACKDATE."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before - BACKDATE)
        .not_valid_after(not_after)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """CA: keyCertSign + cRLSign only. Leaf: digitalSignature only (ECDHE + ECDSA needs no more)."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    public_key: CertificateIssuerPublicKeyTypes,
    sans: Sequence[x509.GeneralName],
    *,
    server: bool,
    days: int,
) -> x509.Certificate:
    """A leaf signed by the CA; its not-after never outlives the CA's (the chain would fail)."""
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _base_builder(subject, ca_cert.subject, public_key, now, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


# ----------------------------------------------------------------- site kits


def add_site(pki_dir: Path, site_id: str, *, days: int = SITE_DAYS) -> Path:
    """Make ``sites/<site_id>/`` with a new key, its clientAuth certificate and the CA cert.

    The kit holds the site's private key, so ship it over a trusted channel; prefer
    :func:`sign_csr` where the site can run ``xkt-client csr`` itself.
    """
    validate_site_id(site_id)
    _check_days(days)
    paths = PkiPaths.of(pki_dir)
    with _pki_lock(paths):
        ca_cert, ca_key = _load_ca(paths)
        _refuse_duplicate(paths, site_id)
        site_key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue_site_cert(ca_cert, ca_key, site_id, site_key.public_key(), days)
        return _publish_kit(paths, site_id, cert, key_pem=_key_pem(site_key), key_source="generated")


def sign_csr(pki_dir: Path, csr_path: Path, *, site_id: str | None = None, days: int = SITE_DAYS) -> Path:
    """Issue a site certificate for a CSR; the kit gets ``site.crt`` and ``ca.crt`` but no key.

    Only the CSR's public key and CN are used: the extensions it requests are ignored and
    the owner's own (clientAuth, URI SAN) are issued, so a site cannot ask for serverAuth
    or CA powers.
    """
    _check_days(days)
    csr = _load_csr(Path(csr_path))
    requested = _csr_site_id(csr, Path(csr_path))
    if site_id is not None and validate_site_id(site_id) != requested:
        raise ConfigError(
            f"the CSR {csr_path} is for site {requested!r}, not {site_id!r}",
            hint="ask the site for a CSR made with `xkt-client csr --site-id` of the right id, or fix --site-id",
            reason="csr-site-mismatch",
        )
    public_key = _check_csr_key(csr, Path(csr_path))
    paths = PkiPaths.of(pki_dir)
    with _pki_lock(paths):
        ca_cert, ca_key = _load_ca(paths)
        _refuse_duplicate(paths, requested)
        cert = _issue_site_cert(ca_cert, ca_key, requested, public_key, days)
        return _publish_kit(paths, requested, cert, key_pem=None, key_source="csr")


def _issue_site_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    site_id: str,
    public_key: CertificateIssuerPublicKeyTypes,
    days: int,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_id)])
    sans = [x509.UniformResourceIdentifier(site_uri(site_id))]
    return _issue_leaf(ca_cert, ca_key, subject, public_key, sans, server=False, days=days)


def _publish_kit(
    paths: PkiPaths, site_id: str, cert: x509.Certificate, *, key_pem: bytes | None, key_source: str
) -> Path:
    """Write the kit in a temporary folder, then rename it into place: a kit is whole or absent."""
    paths.sites.mkdir(mode=0o700, exist_ok=True)
    kit = paths.sites / site_id
    staging = Path(tempfile.mkdtemp(prefix=f".{site_id}-", dir=paths.sites))
    try:
        if key_pem is not None:
            write_new_file(staging / "site.key", key_pem, mode=0o600)
        write_new_file(staging / "site.crt", _cert_pem(cert), mode=0o644)
        write_new_file(staging / "ca.crt", paths.ca_cert.read_bytes(), mode=0o644)
        record = _kit_record(paths, site_id, cert, key_source)
        write_new_file(staging / "kit.json", _json_bytes(record), mode=0o644)
        os.rename(staging, kit)  # fails if kit exists and is not empty; _refuse_duplicate ran under the lock
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    index = _read_index(paths)
    index["sites"].append({**record, "issued_at": _now().isoformat()})
    replace_file(paths.index, _json_bytes(index))
    return kit


def _kit_record(paths: PkiPaths, site_id: str, cert: x509.Certificate, key_source: str) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "site_id": site_id,
        "identity": site_uri(site_id),
        "serial": format(cert.serial_number, "x"),
        "cert_fingerprint": cert_fingerprint(cert),
        "ca_fingerprint": cert_fingerprint(load_cert(paths.ca_cert)),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "key_source": key_source,
    }


def _refuse_duplicate(paths: PkiPaths, site_id: str) -> None:
    kit = paths.sites / site_id
    issued = [e for e in _read_index(paths)["sites"] if e.get("site_id") == site_id]
    revoked = {e["serial"] for e in _read_revoked_doc(paths)["revoked"]}
    if kit.exists() or kit.is_symlink() or any(e.get("serial") not in revoked for e in issued):
        raise ConfigError(
            f"site {site_id!r} already has a kit in {paths.sites}",
            hint=f"pick another site id, or `xkt-server provision revoke {site_id}` and move {kit} away to re-issue",
            reason="site-exists",
        )


def _load_ca(paths: PkiPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not paths.ca_cert.exists():
        raise ConfigError(
            f"no PKI in {paths.root} (ca.crt is missing)",
            hint="run `xkt-server provision init --out PKI` first, or fix --pki",
            reason="pki-not-found",
        )
    cert, key = load_cert(paths.ca_cert), load_private_key(paths.ca_key)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(
            f"{paths.ca_key} is not the private key of {paths.ca_cert}",
            hint="restore the CA key pair that `provision init` wrote together",
            reason="ca-key-mismatch",
        )
    return cert, key


# ----------------------------------------------------------------------- CSR


def _load_csr(path: Path) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(read_pem_bytes(path, what="certificate request"))
    except ValueError:
        raise ConfigError(
            f"{path} is not a PEM certificate signing request",
            hint="pass the site.csr written by `xkt-client csr` (-----BEGIN CERTIFICATE REQUEST-----)",
            reason="bad-csr",
        ) from None
    if not csr.is_signature_valid:
        raise ConfigError(
            f"the CSR {path} is not signed by the key it contains",
            hint="the request was altered or corrupted in transit; ask the site to send it again",
            reason="csr-bad-signature",
        )
    return csr


def _csr_site_id(csr: x509.CertificateSigningRequest, path: Path) -> str:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise ConfigError(
            f"the CSR {path} must have exactly one common name (the site id)",
            hint="create the request with `xkt-client csr --site-id ID`",
            reason="csr-no-site-id",
        )
    return validate_site_id(names[0].value)


def _check_csr_key(csr: x509.CertificateSigningRequest, path: Path) -> CertificateIssuerPublicKeyTypes:
    """Accept ECDSA P-256/P-384 or RSA ≥ 2048 (what gRPC TLS can use); refuse everything else."""
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _ALLOWED_CURVES):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS:
        return key
    found = f"{key.curve.name} EC" if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__.lstrip("_")
    if isinstance(key, rsa.RSAPublicKey):
        found = f"{key.key_size}-bit RSA"
    raise ConfigError(
        f"the CSR {path} has a weak or unsupported key ({found})",
        hint="use ECDSA P-256 (what `xkt-client csr` makes), P-384, or RSA of at least 2048 bits",
        reason="csr-weak-key",
    )


# -------------------------------------------------------- index and revocation


def revoke_site(pki_dir: Path, site_id: str) -> list[int]:
    """Record every unrevoked certificate of ``site_id`` in ``revoked.json``; return the serials.

    Nothing is deleted: the server refuses these serials (see the module docstring) and
    the kit folder stays as evidence until the owner moves it away.
    """
    validate_site_id(site_id)
    paths = PkiPaths.of(pki_dir)
    with _pki_lock(paths):
        issued = [e["serial"] for e in _read_index(paths)["sites"] if e.get("site_id") == site_id]
        if not issued:
            raise ConfigError(
                f"no certificate was issued to site {site_id!r} in {paths.root}",
                hint="check the site id (see sites/ and index.json) and --pki",
                reason="site-not-found",
            )
        doc = _read_revoked_doc(paths)
        already = {e["serial"] for e in doc["revoked"]}
        new = [s for s in issued if s not in already]
        if not new:
            raise ConfigError(
                f"site {site_id!r} is already revoked",
                hint="nothing to do; the server refuses its certificates",
                reason="already-revoked",
            )
        when = _now().isoformat()
        doc["revoked"] += [{"serial": s, "site_id": site_id, "revoked_at": when} for s in new]
        replace_file(paths.revoked, _json_bytes(doc))
    return [int(s, 16) for s in new]


def load_revoked(pki_dir: Path) -> set[int]:
    """The revoked client serials; empty if nothing was revoked, ConfigError if the file is bad.

    A server calls this at start (and on reload) and refuses any peer whose certificate
    serial is in the set; an unreadable list fails closed rather than admitting everyone.
    """
    return {int(e["serial"], 16) for e in _read_revoked_doc(PkiPaths.of(pki_dir))["revoked"]}


def _read_revoked_doc(paths: PkiPaths) -> dict[str, Any]:
    if not paths.revoked.exists():
        return {"schema_version": 1, "revoked": []}
    doc = _read_json(paths.revoked)
    entries = doc.get("revoked")
    if not isinstance(entries, list) or not all(_is_serial_entry(e) for e in entries):
        raise _bad_json(paths.revoked)
    return doc


def _read_index(paths: PkiPaths) -> dict[str, Any]:
    if not paths.index.exists():
        raise ConfigError(
            f"no PKI index in {paths.root} (index.json is missing)",
            hint="run `xkt-server provision init --out PKI` first, or fix --pki",
            reason="pki-not-found",
        )
    doc = _read_json(paths.index)
    entries = doc.get("sites")
    if not isinstance(entries, list) or not all(_is_serial_entry(e) for e in entries):
        raise _bad_json(paths.index)
    return doc


def _is_serial_entry(entry: object) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("serial"), str):
        return False
    return re.fullmatch(r"[0-9a-f]{1,40}", entry["serial"]) is not None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = strict_json_loads(path.read_bytes())
    except (OSError, ValueError):
        raise _bad_json(path) from None
    if not isinstance(doc, dict):
        raise _bad_json(path)
    return doc


def _bad_json(path: Path) -> ConfigError:
    return ConfigError(
        f"{path} is unreadable or not the JSON xkt wrote",
        hint="restore it from a backup; each kit's kit.json holds its serial and fingerprint",
        reason="bad-pki-file",
    )


@contextmanager
def _pki_lock(paths: PkiPaths) -> Iterator[None]:
    """An exclusive ``flock`` on ``PKI/.lock`` so two provision commands never interleave."""
    if not paths.root.is_dir():
        raise ConfigError(
            f"PKI folder {paths.root} does not exist",
            hint="run `xkt-server provision init --out PKI` first, or fix --pki",
            reason="pki-not-found",
        )
    fd = os.open(paths.root / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
