"""The owner's PKI (xkt.server.provision), the TLS file helpers (xkt.shared.tls) and the CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from typer.testing import CliRunner

from xkt.server import provision
from xkt.server.commands import provision as provision_cli
from xkt.shared.errors import ConfigError, XktError
from xkt.shared.tls import (
    cert_fingerprint,
    check_key_permissions,
    describe_cert,
    load_cert,
    peer_cert_from_auth_context,
    read_pem_bytes,
    site_id_from_cert,
)


def _reason(excinfo: pytest.ExceptionInfo[XktError]) -> str:
    err = excinfo.value
    assert err.message and "\n" not in err.message and err.hint
    return err.reason


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` except the bookkeeping that adding a site is allowed to change."""
    skip = {"index.json", ".lock"}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name not in skip}


@pytest.fixture
def pki(tmp_path: Path) -> provision.PkiPaths:
    return provision.init_pki(tmp_path / "pki", server_names=("localhost", "owner.example.org"), server_ips=())


# --------------------------------------------------------------------------- init


def test_server_chain_verifies_for_loopback_and_names(pki: provision.PkiPaths) -> None:
    store = Store([load_cert(pki.ca_cert)])
    server = load_cert(pki.server_cert)
    for name in (x509.DNSName("localhost"), x509.DNSName("owner.example.org")):
        PolicyBuilder().store(store).build_server_verifier(name).verify(server, [])
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    PolicyBuilder().store(store).build_server_verifier(loopback).verify(server, [])


def test_ca_and_server_extensions(pki: provision.PkiPaths) -> None:
    ca, server = load_cert(pki.ca_cert), load_cert(pki.server_cert)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    assert server.not_valid_before_utc < dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)  # backdated
    assert ca.serial_number != server.serial_number


def test_loopback_ip_is_always_a_san(tmp_path: Path) -> None:
    paths = provision.init_pki(tmp_path / "p", server_names=("owner.example.org",), server_ips=("10.0.0.5",))
    sans = describe_cert(load_cert(paths.server_cert)).sans
    assert "IP:127.0.0.1" in sans and "IP:10.0.0.5" in sans and "DNS:owner.example.org" in sans


def test_private_keys_are_0600(pki: provision.PkiPaths) -> None:
    assert _mode(pki.ca_key) == 0o600 and _mode(pki.server_key) == 0o600
    assert _mode(pki.ca_cert) == 0o644


def test_init_refuses_to_overwrite(pki: provision.PkiPaths) -> None:
    before = _snapshot(pki.root)
    with pytest.raises(ConfigError) as excinfo:
        provision.init_pki(pki.root)
    assert _reason(excinfo) == "pki-exists"
    assert _snapshot(pki.root) == before


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"server_names": ("bad name",)}, "bad-server-name"),
        ({"server_names": ("-x.org",)}, "bad-server-name"),
        ({"server_ips": ("300.1.1.1",)}, "bad-server-ip"),
        ({"days": 0}, "bad-days"),
    ],
)
def test_init_refuses_bad_inputs(tmp_path: Path, kwargs: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        provision.init_pki(tmp_path / "p", **kwargs)
    assert _reason(excinfo) == reason
    assert not (tmp_path / "p" / "ca.key").exists()


# ---------------------------------------------------------------------- add-site


def test_site_kit_verifies_as_client_and_names_the_site(pki: provision.PkiPaths) -> None:
    kit = provision.add_site(pki.root, "site-a")
    assert sorted(p.name for p in kit.iterdir()) == ["ca.crt", "kit.json", "site.crt", "site.key"]
    assert _mode(kit / "site.key") == 0o600
    assert (kit / "ca.crt").read_bytes() == pki.ca_cert.read_bytes()
    cert = load_cert(kit / "site.crt")
    verifier = PolicyBuilder().store(Store([load_cert(pki.ca_cert)])).build_client_verifier()
    verified = verifier.verify(cert, [])
    assert x509.UniformResourceIdentifier("xkt://site/site-a") in (verified.subjects or [])
    assert site_id_from_cert(cert) == "site-a"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    record = json.loads((kit / "kit.json").read_text())
    assert record["site_id"] == "site-a" and record["cert_fingerprint"] == cert_fingerprint(cert)
    assert record["ca_fingerprint"] == cert_fingerprint(load_cert(pki.ca_cert))
    assert record["not_after"] == cert.not_valid_after_utc.isoformat()
    key = serialization.load_pem_private_key((kit / "site.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()


def test_adding_a_site_leaves_ca_and_other_kits_byte_identical(pki: provision.PkiPaths) -> None:
    provision.add_site(pki.root, "site-a")
    before = _snapshot(pki.root)
    provision.add_site(pki.root, "site-b")
    after = _snapshot(pki.root)
    assert {k: v for k, v in after.items() if not k.startswith("sites/site-b/")} == before
    index = json.loads(pki.index.read_text())
    assert [e["site_id"] for e in index["sites"]] == ["site-a", "site-b"]


def test_duplicate_site_refused(pki: provision.PkiPaths) -> None:
    provision.add_site(pki.root, "site-a")
    with pytest.raises(ConfigError) as excinfo:
        provision.add_site(pki.root, "site-a")
    assert _reason(excinfo) == "site-exists"
    assert len(json.loads(pki.index.read_text())["sites"]) == 1


@pytest.mark.parametrize("site_id", ["", "Site", "-a", "a/b", "..", "a.b", "a" * 64, "a_b"])
def test_invalid_site_ids_refused(pki: provision.PkiPaths, site_id: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        provision.add_site(pki.root, site_id)
    assert _reason(excinfo) == "bad-site-id"


def test_add_site_needs_a_pki_and_a_private_ca_key(tmp_path: Path, pki: provision.PkiPaths) -> None:
    with pytest.raises(ConfigError) as excinfo:
        provision.add_site(tmp_path / "nowhere", "site-a")
    assert _reason(excinfo) == "pki-not-found"
    os.chmod(pki.ca_key, 0o644)
    with pytest.raises(ConfigError) as excinfo:
        provision.add_site(pki.root, "site-a")
    assert _reason(excinfo) == "key-permissions"
    assert not (pki.sites / "site-a").exists()


# ------------------------------------------------------------------------ revoke


def test_revoke_records_serial_and_allows_reissue_after_move(pki: provision.PkiPaths) -> None:
    kit = provision.add_site(pki.root, "site-a")
    serial = load_cert(kit / "site.crt").serial_number
    assert provision.load_revoked(pki.root) == set()
    assert provision.revoke_site(pki.root, "site-a") == [serial]
    assert provision.load_revoked(pki.root) == {serial}
    entry = json.loads(pki.revoked.read_text())["revoked"][0]
    assert entry["site_id"] == "site-a" and int(entry["serial"], 16) == serial and entry["revoked_at"]
    with pytest.raises(ConfigError) as excinfo:
        provision.revoke_site(pki.root, "site-a")
    assert _reason(excinfo) == "already-revoked"
    with pytest.raises(ConfigError):
        provision.add_site(pki.root, "site-a")  # the old kit folder is still there
    kit.rename(pki.root / "site-a.revoked")
    new_serial = load_cert(provision.add_site(pki.root, "site-a") / "site.crt").serial_number
    assert new_serial not in provision.load_revoked(pki.root)


def test_revoke_unknown_site_and_corrupt_list(pki: provision.PkiPaths) -> None:
    with pytest.raises(ConfigError) as excinfo:
        provision.revoke_site(pki.root, "nobody")
    assert _reason(excinfo) == "site-not-found"
    pki.revoked.write_text('{"revoked": [{"serial": 12}]}')
    with pytest.raises(ConfigError) as excinfo:
        provision.load_revoked(pki.root)
    assert _reason(excinfo) == "bad-pki-file"


# ------------------------------------------------------------------- tls helpers


def test_tls_file_errors(tmp_path: Path, pki: provision.PkiPaths) -> None:
    cases: list[tuple[Path, str]] = [(tmp_path / "missing.crt", "tls-file-not-found"), (tmp_path, "tls-not-a-file")]
    (tmp_path / "der.crt").write_bytes(load_cert(pki.ca_cert).public_bytes(serialization.Encoding.DER))
    cases.append((tmp_path / "der.crt", "not-pem"))
    cases.append((pki.server_key, "private-key-given"))
    (tmp_path / "junk.crt").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    cases.append((tmp_path / "junk.crt", "not-a-certificate"))
    for path, reason in cases:
        with pytest.raises(ConfigError) as excinfo:
            load_cert(path)
        assert _reason(excinfo) == reason, path


def test_key_permission_checks(pki: provision.PkiPaths) -> None:
    check_key_permissions(pki.server_key)
    os.chmod(pki.server_key, 0o640)
    for check in (lambda: check_key_permissions(pki.server_key), lambda: read_pem_bytes(pki.server_key, private=True)):
        with pytest.raises(ConfigError) as excinfo:
            check()
        assert _reason(excinfo) == "key-permissions"


def test_describe_and_identity_helpers(pki: provision.PkiPaths) -> None:
    server = load_cert(pki.server_cert)
    info = describe_cert(server)
    assert info.subject == "CN=localhost" and "DNS:localhost" in info.line()
    assert info.to_json()["serial"] == format(server.serial_number, "x")
    assert site_id_from_cert(server) is None  # a server certificate names no site
    pem = server.public_bytes(serialization.Encoding.PEM)
    assert peer_cert_from_auth_context({"x509_pem_cert": [pem]}) == server
    assert peer_cert_from_auth_context({}) is None


# ---------------------------------------------------------------------------- CLI


def test_cli_init_add_revoke(tmp_path: Path) -> None:
    runner = CliRunner()
    app = typer.Typer()
    app.add_typer(provision_cli.app, name="provision")
    out = tmp_path / "pki"
    result = runner.invoke(app, ["provision", "init", "--out", str(out), "--server-ip", "10.1.2.3", "--json"])
    assert result.exit_code == 0, result.output
    assert "IP:10.1.2.3" in json.loads(result.stdout)["server"]["sans"]
    result = runner.invoke(app, ["provision", "add-site", "site-a", "--pki", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["site_id"] == "site-a"
    result = runner.invoke(app, ["provision", "revoke", "site-a", "--pki", str(out), "--json"])
    assert result.exit_code == 0 and len(json.loads(result.stdout)["revoked_serials"]) == 1
    result = runner.invoke(app, ["provision", "init", "--out", str(out), "--json"])
    assert result.exit_code == 3 and json.loads(result.stdout)["error"]["reason"] == "pki-exists"


# ------------------------------------------------------------ real TLS handshake


@pytest.fixture
def grpc_server(pki: provision.PkiPaths) -> Iterator[int]:
    """A gRPC server with only the Health service, mutual TLS required, and a revocation check."""
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    from grpc_health.v1 import health_pb2_grpc

    class CheckedHealth(health.HealthServicer):  # type: ignore[misc]
        def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's method name
            cert = peer_cert_from_auth_context(context.auth_context())
            if cert is None or cert.serial_number in provision.load_revoked(pki.root) or not site_id_from_cert(cert):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "certificate refused")
            return super().Check(request, context)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    try:
        health_pb2_grpc.add_HealthServicer_to_server(CheckedHealth(), server)
        key_pair = [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())]
        creds = grpc.ssl_server_credentials(
            key_pair, root_certificates=pki.ca_cert.read_bytes(), require_client_auth=True
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        yield port
    finally:
        server.stop(None)


def _health_check(port: int, kit: Path, *, with_cert: bool = True) -> Any:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    creds = grpc.ssl_channel_credentials(
        root_certificates=(kit / "ca.crt").read_bytes(),
        private_key=(kit / "site.key").read_bytes() if with_cert else None,
        certificate_chain=(kit / "site.crt").read_bytes() if with_cert else None,
    )
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)


def test_mutual_tls_handshake(grpc_server: int, pki: provision.PkiPaths, tmp_path: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2

    kit = provision.add_site(pki.root, "site-a")
    assert _health_check(grpc_server, kit).status == health_pb2.HealthCheckResponse.SERVING

    other = provision.init_pki(tmp_path / "other")
    stranger = provision.add_site(other.root, "site-a")
    mixed = tmp_path / "mixed"  # trusts our server, but its client cert is from another CA
    mixed.mkdir()
    for name in ("site.key", "site.crt"):
        (mixed / name).write_bytes((stranger / name).read_bytes())
    (mixed / "ca.crt").write_bytes(pki.ca_cert.read_bytes())
    for bad_kit, with_cert in ((mixed, True), (kit, False)):
        with pytest.raises(grpc.RpcError) as excinfo:
            _health_check(grpc_server, bad_kit, with_cert=with_cert)
        assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE

    provision.revoke_site(pki.root, "site-a")
    with pytest.raises(grpc.RpcError) as excinfo:
        _health_check(grpc_server, kit)
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
