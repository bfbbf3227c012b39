"""Throw-away certificate authorities and certificates for transport-security tests.

Independent of the product's provisioning code on purpose: a test of the server's TLS
handling must not pass just because both sides share the same bug.  EC P-256 keys keep
generation fast.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files on disk and as bytes."""

    cert_path: Path
    key_path: Path

    @property
    def cert(self) -> bytes:
        return self.cert_path.read_bytes()

    @property
    def key(self) -> bytes:
        return self.key_path.read_bytes()


@dataclass(frozen=True)
class CA:
    """A self-signed CA that can issue server and client certificates into ``folder``."""

    name: str
    folder: Path
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def cert_path(self) -> Path:
        return self.folder / f"{self.name}.pem"

    @property
    def cert(self) -> bytes:
        return self.cert_path.read_bytes()

    def issue(
        self,
        stem: str,
        common_name: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool,
        valid: tuple[dt.datetime, dt.datetime] | None = None,
        key: CertificateIssuerPrivateKeyTypes | None = None,
    ) -> Issued:
        """A leaf for ``common_name``; ``valid`` (not before, not after) and ``key`` default to now-5 min..+1 day, P-256."""
        key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = _base(common_name, key, self.certificate.subject, valid)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _write(self.folder, stem, cert, key)


def _base(
    common_name: str,
    key: CertificateIssuerPrivateKeyTypes,
    issuer: x509.Name,
    valid: tuple[dt.datetime, dt.datetime] | None = None,
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = valid or (now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _write(folder: Path, stem: str, cert: x509.Certificate, key: CertificateIssuerPrivateKeyTypes) -> Issued:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Issued(cert_path, key_path)


def make_ca(folder: Path, name: str) -> CA:
    """A new self-signed CA whose certificate is written to ``folder/NAME.pem``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"xkt test CA {name}")])
    builder = _base(f"xkt test CA {name}", key, subject)
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    cert = builder.sign(key, hashes.SHA256())
    ca = CA(name, folder, key, cert)
    ca.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


@dataclass(frozen=True)
class Pki:
    """The usual cast: the owner's CA, a server certificate, a good site and an impostor."""

    ca: CA
    other_ca: CA
    server: Issued
    wrong_host_server: Issued
    site: Issued
    impostor: Issued


def make_pki(folder: Path) -> Pki:
    ca, other = make_ca(folder, "owner-ca"), make_ca(folder, "other-ca")
    return Pki(
        ca=ca,
        other_ca=other,
        server=ca.issue("server", "xkt-server", dns=("localhost",), ips=("127.0.0.1",), server=True),
        wrong_host_server=ca.issue("wrong-host", "elsewhere", dns=("elsewhere.example",), server=True),
        site=ca.issue("site-a", "site-a", server=False),
        impostor=other.issue("impostor", "site-a", server=False),
    )
