"""The source-model server on real loopback sockets: TLS, mutual TLS, tokens, health, audit.

Servers run in-process through ``run_server`` on 127.0.0.1 port 0 (one per transport
setup, shared by the module), plus one real ``xkt-server serve`` subprocess stopped with
SIGTERM.  Every RPC has a short deadline so a hang fails fast instead of stalling CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xkt.protos import source_model_pb2 as pb
from xkt.protos import source_model_pb2_grpc as pb_grpc
from xkt.server.audit_log import verify_log
from xkt.server.auth import add_token
from xkt.server.provision import add_site, init_pki, revoke_site
from xkt.server.serving import RunningServer, ServeConfig, check_transport, run_server
from xkt.shared.artifact import InputSpec, save_artifact
from xkt.shared.errors import ConfigError
from xkt.shared.grpc_options import MIN_CHUNK_BYTES, client_options
from xkt.shared.models import ArchSpec, batchnorm_layers, batchnorm_statistics, build_model
from xkt.shared.serde import batchnorm_stats_from_proto
from xkt.shared.signing import generate_keypair, load_private_key, load_public_key, verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tls_fixtures import Pki, make_pki  # noqa: E402

ARCH = ArchSpec("resnet_tiny", num_classes=6)
DEADLINE = 10.0
pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Owner:
    model_dir: Path
    owner_pub: Path
    model: torch.nn.Module
    pki: Pki
    tokens: Path
    token: str
    root: Path

    def config(self, **changes: object) -> ServeConfig:
        base = ServeConfig(
            model_dir=self.model_dir,
            owner_key=self.owner_pub,
            tls_cert=self.pki.server.cert_path,
            tls_key=self.pki.server.key_path,
            tokens=self.tokens,
            chunk_size=MIN_CHUNK_BYTES,
            grace_s=1.0,
        )
        return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Owner:
    root = tmp_path_factory.mktemp("serving")
    key_path, pub_path = generate_keypair(root / "keys")
    torch.manual_seed(0)
    model = build_model(ARCH)
    for _name, layer in batchnorm_layers(model):
        assert layer.running_mean is not None and layer.running_var is not None
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    save_artifact(
        model.eval(),
        out_dir=root / "model",
        private_key=load_private_key(key_path),
        model_id="toy",
        model_version="1",
        arch=ARCH,
        class_names=["a", "b", "c", "d", "e", "f"],
        input_spec=InputSpec("rgb", 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        provenance={"trainer": "test"},
    )
    token = add_token(root / "tokens.txt", "site-a")
    return Owner(root / "model", pub_path, model, make_pki(root / "pki"), root / "tokens.txt", token, root)


@pytest.fixture(scope="module")
def tls_server(owner: Owner) -> Iterator[RunningServer]:
    with run_server(owner.config(audit_log=owner.root / "audit.jsonl")) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(owner: Owner) -> Iterator[RunningServer]:
    with run_server(owner.config(client_ca=owner.pki.ca.cert_path, tokens=None)) as running:
        yield running


def tls_channel(port: int, root: bytes, *, key: bytes | None = None, cert: bytes | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=client_options())


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def fetch(stub: pb_grpc.SourceModelStub, sha256: str, offset: int, token: str) -> list[pb.WeightsChunk]:
    request = pb.FetchWeightsRequest(sha256=sha256, offset=offset)
    return list(stub.FetchWeights(request, timeout=DEADLINE, metadata=bearer(token)))


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call() if callable(call) else None
    return info.value.code()  # type: ignore[no-any-return]


# ------------------------------------------------------------------ the RPCs


def test_manifest_is_signed_by_the_owner(owner: Owner, tls_server: RunningServer) -> None:
    with tls_channel(tls_server.port, owner.pki.ca.cert) as channel:
        reply = pb_grpc.SourceModelStub(channel).GetManifest(
            pb.GetManifestRequest(), timeout=DEADLINE, metadata=bearer(owner.token)
        )
    assert reply.manifest_json == (owner.model_dir / "manifest.json").read_bytes()
    verify(load_public_key(owner.owner_pub), reply.manifest_json, reply.signature)
    weights = (owner.model_dir / "weights.safetensors").read_bytes()
    assert reply.weights_sha256 == hashlib.sha256(weights).hexdigest() == tls_server.model_sha256
    assert reply.weights_size == len(weights) and reply.chunk_size == MIN_CHUNK_BYTES


def test_fetch_full_and_resumed_equals_the_file(owner: Owner, tls_server: RunningServer) -> None:
    weights = (owner.model_dir / "weights.safetensors").read_bytes()
    sha = hashlib.sha256(weights).hexdigest()
    with tls_channel(tls_server.port, owner.pki.ca.cert) as channel:
        stub = pb_grpc.SourceModelStub(channel)
        for offset in (0, 100_001, len(weights)):
            chunks = fetch(stub, sha, offset, owner.token)
            assert b"".join(c.data for c in chunks) == weights[offset:]
            position = offset
            for chunk in chunks:
                assert chunk.offset == position and 0 < len(chunk.data) <= MIN_CHUNK_BYTES
                assert chunk.sha256 == hashlib.sha256(chunk.data).hexdigest()
                position += len(chunk.data)
        assert code_of(lambda: fetch(stub, sha, len(weights) + 1, owner.token)) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: fetch(stub, "0" * 64, 0, owner.token)) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: fetch(stub, "not-hex", 0, owner.token)) == grpc.StatusCode.INVALID_ARGUMENT


def test_batchnorm_stats_equal_the_models(owner: Owner, tls_server: RunningServer) -> None:
    with tls_channel(tls_server.port, owner.pki.ca.cert) as channel:
        reply = pb_grpc.SourceModelStub(channel).GetBatchNormStats(
            pb.GetBatchNormStatsRequest(sha256=tls_server.model_sha256), timeout=DEADLINE, metadata=bearer(owner.token)
        )
    got, want = batchnorm_stats_from_proto(reply), batchnorm_statistics(owner.model)
    assert [s.name for s in got] == [s.name for s in want]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.running_mean, w.running_mean) and torch.equal(g.running_var, w.running_var)
        assert (g.momentum, g.eps) == (w.momentum, w.eps)


def test_missing_or_wrong_token_is_unauthenticated(owner: Owner, tls_server: RunningServer) -> None:
    with tls_channel(tls_server.port, owner.pki.ca.cert) as channel:
        stub = pb_grpc.SourceModelStub(channel)
        no_token = lambda: stub.GetManifest(pb.GetManifestRequest(), timeout=DEADLINE)  # noqa: E731
        assert code_of(no_token) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: fetch(stub, tls_server.model_sha256, 0, "x" * 43)) == grpc.StatusCode.UNAUTHENTICATED


def test_health_reports_serving_without_credentials(owner: Owner, tls_server: RunningServer) -> None:
    with tls_channel(tls_server.port, owner.pki.ca.cert) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "xkt.v1.SourceModel"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------ transport security


def test_plaintext_client_against_tls_port_fails(tls_server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.port}", options=client_options()) as channel:
        call = lambda: pb_grpc.SourceModelStub(channel).GetManifest(pb.GetManifestRequest(), timeout=3)  # noqa: E731
        assert code_of(call) == grpc.StatusCode.UNAVAILABLE


def test_wrong_server_ca_fails(owner: Owner, tls_server: RunningServer) -> None:
    with tls_channel(tls_server.port, owner.pki.other_ca.cert) as channel:
        call = lambda: pb_grpc.SourceModelStub(channel).GetManifest(pb.GetManifestRequest(), timeout=3)  # noqa: E731
        assert code_of(call) == grpc.StatusCode.UNAVAILABLE


def test_hostname_mismatch_fails(owner: Owner) -> None:
    cfg = owner.config(tls_cert=owner.pki.wrong_host_server.cert_path, tls_key=owner.pki.wrong_host_server.key_path)
    with run_server(cfg) as running, tls_channel(running.port, owner.pki.ca.cert) as channel:
        call = lambda: pb_grpc.SourceModelStub(channel).GetManifest(  # noqa: E731
            pb.GetManifestRequest(), timeout=3, metadata=bearer(owner.token)
        )
        assert code_of(call) == grpc.StatusCode.UNAVAILABLE


def test_mtls_accepts_the_owners_site_and_refuses_others(owner: Owner, mtls_server: RunningServer) -> None:
    site, impostor = owner.pki.site, owner.pki.impostor
    with tls_channel(mtls_server.port, owner.pki.ca.cert, key=site.key, cert=site.cert) as channel:
        reply = pb_grpc.SourceModelStub(channel).GetManifest(pb.GetManifestRequest(), timeout=DEADLINE)
        assert reply.weights_sha256 == mtls_server.model_sha256
    for key, cert in ((impostor.key, impostor.cert), (None, None)):
        with tls_channel(mtls_server.port, owner.pki.ca.cert, key=key, cert=cert) as channel:
            call = lambda: pb_grpc.SourceModelStub(channel).GetManifest(pb.GetManifestRequest(), timeout=3)  # noqa: E731, B023
            assert code_of(call) == grpc.StatusCode.UNAVAILABLE


def test_insecure_off_loopback_needs_force(owner: Owner) -> None:
    cfg = owner.config(insecure=True, listen="0.0.0.0:0", tls_cert=None, tls_key=None)
    with pytest.raises(ConfigError) as info:
        check_transport(cfg)
    assert info.value.reason == "insecure-non-loopback" and "--force-insecure" in info.value.hint
    check_transport(replace(cfg, force_insecure=True))
    with pytest.raises(ConfigError):
        check_transport(owner.config(tls_cert=None))  # TLS is the default: no cert, no server
    with pytest.raises(ConfigError):
        check_transport(owner.config(tokens=None))  # nobody could be identified


def test_insecure_loopback_serves(owner: Owner) -> None:
    with (
        run_server(owner.config(insecure=True, tls_cert=None, tls_key=None)) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}", options=client_options()) as channel,
    ):
        reply = pb_grpc.SourceModelStub(channel).GetManifest(
            pb.GetManifestRequest(), timeout=DEADLINE, metadata=bearer(owner.token)
        )
        assert reply.weights_sha256 == running.model_sha256


# ------------------------------------------------------------------ audit and the real command


def test_audit_log_records_calls_and_verifies(owner: Owner, tls_server: RunningServer) -> None:
    with tls_channel(tls_server.port, owner.pki.ca.cert) as channel:
        stub = pb_grpc.SourceModelStub(channel)
        stub.GetManifest(pb.GetManifestRequest(), timeout=DEADLINE, metadata=bearer(owner.token))
        fetch(stub, tls_server.model_sha256, 0, owner.token)
    log = owner.root / "audit.jsonl"
    check = verify_log(log)
    assert check.ok and check.entries >= 2, check
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    fetched = [e for e in entries if e["rpc"] == "FetchWeights" and e["outcome"] == "OK" and e["bytes_sent"] > 0]
    assert fetched and all(e["site"] == "site-a" for e in fetched)
    assert all(e["model_sha256"] == tls_server.model_sha256 for e in entries)


def _serve_cli_registered() -> bool:
    from xkt.server.cli import app

    return any(c.name == "serve" for c in app.registered_commands)


@pytest.mark.skipif(not _serve_cli_registered(), reason="`serve` is not registered in server/cli.py yet")
def test_xkt_server_serve_subprocess(owner: Owner) -> None:
    exe = Path(sys.executable).parent / "xkt-server"
    args = [str(exe), "serve", "--model", str(owner.model_dir), "--owner-key", str(owner.owner_pub)]
    args += ["--listen", "127.0.0.1:0", "--tls-cert", str(owner.pki.server.cert_path)]
    args += ["--tls-key", str(owner.pki.server.key_path), "--tokens", str(owner.tokens), "--json", "--grace", "1"]
    args += ["--audit-log", str(owner.root / "cli-audit.jsonl")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        announced = json.loads(line)
        assert announced["ok"] is True and announced["listen"].startswith("127.0.0.1:")
        with tls_channel(announced["port"], owner.pki.ca.cert) as channel:
            chunks = fetch(pb_grpc.SourceModelStub(channel), announced["model_sha256"], 0, owner.token)
        assert b"".join(c.data for c in chunks) == (owner.model_dir / "weights.safetensors").read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    verify = subprocess.run(
        [str(exe), "audit", "verify", str(owner.root / "cli-audit.jsonl"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0 and json.loads(verify.stdout)["entries"] >= 1
    lines = (owner.root / "cli-audit.jsonl").read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace('"bytes_sent":', '"bytes_sent":1', 1)
    (owner.root / "cli-audit.jsonl").write_text("".join(lines))
    broken = subprocess.run(
        [str(exe), "audit", "verify", str(owner.root / "cli-audit.jsonl")], capture_output=True, text=True, timeout=60
    )
    assert broken.returncode == 4 and "line 1" in broken.stderr


@pytest.mark.skipif(not _serve_cli_registered(), reason="`serve` is not registered in server/cli.py yet")
def test_xkt_server_serve_refuses_insecure_off_loopback(owner: Owner) -> None:
    exe = Path(sys.executable).parent / "xkt-server"
    args = [str(exe), "serve", "--model", str(owner.model_dir), "--owner-key", str(owner.owner_pub), "--json"]
    args += ["--listen", "0.0.0.0:0", "--insecure", "--tokens", str(owner.tokens)]
    completed = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 3, completed.stderr
    assert json.loads(completed.stdout)["error"]["reason"] == "insecure-non-loopback"


def test_provisioned_site_is_identified_and_refused_once_revoked(owner: Owner, tmp_path: Path) -> None:
    """The product's own PKI end to end: `provision` kits, the URI-SAN identity, revocation."""
    pki = tmp_path / "pki"
    paths = init_pki(pki)
    kit = add_site(pki, "clinic-7")
    root, key, cert = ((kit / n).read_bytes() for n in ("ca.crt", "site.key", "site.crt"))
    cfg = owner.config(
        tls_cert=paths.server_cert, tls_key=paths.server_key, client_ca=paths.ca_cert, pki=pki, tokens=None
    )
    audit = tmp_path / "audit.jsonl"
    with (
        run_server(replace(cfg, audit_log=audit)) as running,
        tls_channel(running.port, root, key=key, cert=cert) as ch,
    ):
        pb_grpc.SourceModelStub(ch).GetManifest(pb.GetManifestRequest(), timeout=DEADLINE)
    assert json.loads(audit.read_text().splitlines()[0])["site"] == "clinic-7"
    revoke_site(pki, "clinic-7")
    with run_server(cfg) as running, tls_channel(running.port, root, key=key, cert=cert) as ch:
        call = lambda: pb_grpc.SourceModelStub(ch).GetManifest(pb.GetManifestRequest(), timeout=3)  # noqa: E731
        assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED
