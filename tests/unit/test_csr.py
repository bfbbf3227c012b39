"""The site's key and CSR (xkt.client.csr) and the owner's sign-csr (xkt.server.provision)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from typer.testing import CliRunner

from xkt.client.commands import csr as csr_cli
from xkt.client.csr import make_csr
from xkt.server import provision
from xkt.shared.errors import ConfigError, XktError
from xkt.shared.tls import load_cert, site_id_from_cert


def _reason(excinfo: pytest.ExceptionInfo[XktError]) -> str:
    err = excinfo.value
    assert err.message and "\n" not in err.message and err.hint
    return err.reason


@pytest.fixture
def pki(tmp_path: Path) -> provision.PkiPaths:
    return provision.init_pki(tmp_path / "pki")


def _write_csr(path: Path, key: CertificateIssuerPrivateKeyTypes, common_name: str) -> Path:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, algorithm)
    )
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def test_make_csr_writes_private_key_and_signed_request(tmp_path: Path) -> None:
    key_path, csr_path = make_csr("site-b", tmp_path / "site")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-b"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["xkt://site/site-b"]
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key() == csr.public_key()


def test_make_csr_refuses_overwrite_and_bad_ids(tmp_path: Path) -> None:
    key_path, _ = make_csr("site-b", tmp_path)
    before = key_path.read_bytes()
    with pytest.raises(ConfigError) as excinfo:
        make_csr("site-b", tmp_path)
    assert _reason(excinfo) == "file-exists"
    assert key_path.read_bytes() == before
    with pytest.raises(ConfigError) as excinfo:
        make_csr("Bad/Id", tmp_path / "x")
    assert _reason(excinfo) == "bad-site-id"


def test_csr_round_trip_keeps_the_key_at_the_site(tmp_path: Path, pki: provision.PkiPaths) -> None:
    key_path, csr_path = make_csr("site-b", tmp_path / "site")
    kit = provision.sign_csr(pki.root, csr_path, site_id="site-b")
    assert sorted(p.name for p in kit.iterdir()) == ["ca.crt", "kit.json", "site.crt"]
    cert = load_cert(kit / "site.crt")
    site_key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert cert.public_key() == site_key.public_key()
    PolicyBuilder().store(Store([load_cert(pki.ca_cert)])).build_client_verifier().verify(cert, [])
    assert site_id_from_cert(cert) == "site-b"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert json.loads((kit / "kit.json").read_text())["key_source"] == "csr"
    key_pem = key_path.read_bytes()
    private_files = {p.name for p in pki.root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}
    assert private_files == {"ca.key", "server.key"}
    assert not any(p.is_file() and p.read_bytes() == key_pem for p in pki.root.rglob("*"))


def test_sign_csr_refuses_mismatched_id_and_duplicates(tmp_path: Path, pki: provision.PkiPaths) -> None:
    _, csr_path = make_csr("site-b", tmp_path / "site")
    with pytest.raises(ConfigError) as excinfo:
        provision.sign_csr(pki.root, csr_path, site_id="site-c")
    assert _reason(excinfo) == "csr-site-mismatch"
    provision.sign_csr(pki.root, csr_path)
    with pytest.raises(ConfigError) as excinfo:
        provision.sign_csr(pki.root, csr_path)
    assert _reason(excinfo) == "site-exists"
    provision.add_site(pki.root, "site-a")
    _, other = make_csr("site-a", tmp_path / "other")
    with pytest.raises(ConfigError) as excinfo:
        provision.sign_csr(pki.root, other)
    assert _reason(excinfo) == "site-exists"


def test_sign_csr_refuses_a_tampered_request(tmp_path: Path, pki: provision.PkiPaths) -> None:
    _, csr_path = make_csr("site-b", tmp_path / "site")
    der = x509.load_pem_x509_csr(csr_path.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert der.count(b"site-b") >= 1
    tampered = x509.load_der_x509_csr(der.replace(b"site-b", b"site-c"))
    bad = tmp_path / "tampered.csr"
    bad.write_bytes(tampered.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError) as excinfo:
        provision.sign_csr(pki.root, bad)
    assert _reason(excinfo) == "csr-bad-signature"
    assert not (pki.sites / "site-c").exists()


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        lambda: ec.generate_private_key(ec.SECP521R1()),
        lambda: ec.generate_private_key(ec.SECP256K1()),
        ed25519.Ed25519PrivateKey.generate,
    ],
    ids=["rsa-1024", "p-521", "secp256k1", "ed25519"],
)
def test_sign_csr_refuses_weak_or_unsupported_keys(tmp_path: Path, pki: provision.PkiPaths, make_key: object) -> None:
    key = make_key()  # type: ignore[operator]
    path = _write_csr(tmp_path / "weak.csr", key, "site-w")
    with pytest.raises(ConfigError) as excinfo:
        provision.sign_csr(pki.root, path)
    assert _reason(excinfo) == "csr-weak-key"


def test_sign_csr_accepts_rsa_2048_and_p384(tmp_path: Path, pki: provision.PkiPaths) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    provision.sign_csr(pki.root, _write_csr(tmp_path / "r.csr", rsa_key, "site-r"))
    p384 = ec.generate_private_key(ec.SECP384R1())
    provision.sign_csr(pki.root, _write_csr(tmp_path / "p.csr", p384, "site-p"))
    assert {p.name for p in pki.sites.iterdir()} == {"site-r", "site-p"}


def test_sign_csr_refuses_non_csr_files(tmp_path: Path, pki: provision.PkiPaths) -> None:
    cases = {pki.ca_cert: "bad-csr", tmp_path / "missing.csr": "tls-file-not-found"}
    bad_cn = _write_csr(tmp_path / "cn.csr", ec.generate_private_key(ec.SECP256R1()), "Not A Site")
    cases[bad_cn] = "bad-site-id"
    for path, reason in cases.items():
        with pytest.raises(ConfigError) as excinfo:
            provision.sign_csr(pki.root, path)
        assert _reason(excinfo) == reason, path


def test_cli_csr_and_sign_csr(tmp_path: Path, pki: provision.PkiPaths) -> None:
    from xkt.server.commands import provision as provision_cli

    app = typer.Typer()
    app.command("csr")(csr_cli.csr)
    app.add_typer(provision_cli.app, name="provision")
    runner = CliRunner()
    result = runner.invoke(app, ["csr", "--site-id", "site-b", "--out", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    csr_path = json.loads(result.stdout)["csr"]
    args = ["provision", "sign-csr", csr_path, "--pki", str(pki.root), "--site-id", "site-x", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 3 and json.loads(result.stdout)["error"]["reason"] == "csr-site-mismatch"
    result = runner.invoke(app, [*args[:-3], "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["site_id"] == "site-b"
