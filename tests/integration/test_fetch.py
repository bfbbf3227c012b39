"""``xkt-client fetch`` / ``doctor`` against real servers on loopback: TLS, mTLS, tokens, resume, cache, egress.

In-process servers come from ``run_server`` (127.0.0.1, port 0); the resume test kills a
real ``xkt-server serve`` subprocess with SIGKILL in the middle of a weight stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xkt.client.channel import ChannelOptions, SourceModelClient, open_channel
from xkt.client.commands.doctor import doctor
from xkt.client.commands.fetch import fetch
from xkt.client.egress import EgressGuard, single_site_manifest
from xkt.client.fetch import fetch_artifact, fetch_batchnorm_stats
from xkt.protos import source_model_pb2 as pb
from xkt.server.serving import RunningServer, ServeConfig, run_server
from xkt.shared.artifact import verify_artifact
from xkt.shared.cli_support import new_app
from xkt.shared.errors import TransportError, XktError
from xkt.shared.grpc_options import MIN_CHUNK_BYTES
from xkt.shared.models import ArchSpec
from xkt.shared.signing import load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owner_fixtures import LoopbackProxy, OwnerFiles, ServedProcess, make_owner, serve_subprocess  # noqa: E402

ARCH = ArchSpec("resnet_tiny", num_classes=6, kwargs={"width": 48})  # ~12 MB: more than loopback buffers hold
pytestmark = pytest.mark.timeout(120)
app = new_app("xkt-client-test", "fetch and doctor")
app.command("fetch")(fetch)
app.command("doctor")(doctor)


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> OwnerFiles:
    return make_owner(tmp_path_factory.mktemp("fetch"), arch=ARCH, class_names=list("abcdef"))


def config(owner: OwnerFiles, **changes: object) -> ServeConfig:
    """The owner's in-process server config with the smallest chunks: many messages per stream."""
    return owner.serve_config(**{"chunk_size": MIN_CHUNK_BYTES, **changes})


@pytest.fixture(scope="module")
def tls_server(owner: OwnerFiles) -> Iterator[RunningServer]:
    with run_server(config(owner, audit_log=owner.root / "audit.jsonl")) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(owner: OwnerFiles) -> Iterator[RunningServer]:
    with run_server(config(owner, client_ca=owner.pki.ca.cert_path, tokens=None)) as running:
        yield running


def token_opts(owner: OwnerFiles, port: int, **changes: object) -> ChannelOptions:
    base = ChannelOptions(
        f"127.0.0.1:{port}", ca_cert=owner.pki.ca.cert_path, token=owner.token_file.read_text().strip()
    )
    return replace(base, unary_deadline_s=5.0, stream_deadline_s=30.0, chunk_idle_s=10.0, **changes)  # type: ignore[arg-type]


def run_fetch(
    opts: ChannelOptions, owner: OwnerFiles, cache: Path, recorded: list[tuple[str, bytes]] | None = None, **kw: object
):  # type: ignore[no-untyped-def]
    egress = single_site_manifest(sha256=None, offset=None, token=opts.token is not None)
    guard = EgressGuard(egress, (lambda m, b: recorded.append((m, b))) if recorded is not None else None)
    with open_channel(opts, [guard]) as channel:
        return fetch_artifact(SourceModelClient(channel, opts), [load_public_key(owner.owner_pub)], cache, **kw)  # type: ignore[arg-type]


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------------ transports


def test_fetch_over_tls_with_token_then_cache_hit(owner: OwnerFiles, tls_server: RunningServer, tmp_path: Path) -> None:
    recorded: list[tuple[str, bytes]] = []
    first = run_fetch(token_opts(owner, tls_server.port), owner, tmp_path, recorded)
    assert first.path == tmp_path / owner.sha256 and not first.cached and first.downloaded == owner.size
    verify_artifact(first.path, [load_public_key(owner.owner_pub)])
    assert (first.path / "weights.safetensors").read_bytes() == (owner.model_dir / "weights.safetensors").read_bytes()
    assert not (tmp_path / f"{owner.sha256}.part").exists()
    recorded.clear()
    second = run_fetch(token_opts(owner, tls_server.port), owner, tmp_path, recorded)
    assert second.cached and second.downloaded == 0
    assert [m for m, _ in recorded] == ["/xkt.v1.SourceModel/GetManifest"]  # no FetchWeights call


def test_fetch_over_mtls_and_batchnorm_stats(owner: OwnerFiles, mtls_server: RunningServer, tmp_path: Path) -> None:
    site = owner.pki.site
    opts = ChannelOptions(
        f"127.0.0.1:{mtls_server.port}",
        ca_cert=owner.pki.ca.cert_path,
        client_cert=site.cert_path,
        client_key=site.key_path,
    )
    result = run_fetch(opts, owner, tmp_path)
    assert result.manifest.weights.sha256 == owner.sha256
    artifact = verify_artifact(result.path, [load_public_key(owner.owner_pub)])
    with open_channel(opts) as channel:
        stats = fetch_batchnorm_stats(SourceModelClient(channel, opts), artifact)
    assert stats and stats[0].running_mean.numel() > 0


def test_cli_fetch_with_token_file_json(owner: OwnerFiles, tls_server: RunningServer, tmp_path: Path) -> None:
    args = ["fetch", "--server", f"127.0.0.1:{tls_server.port}", "--owner-key", str(owner.owner_pub)]
    args += ["--out", str(tmp_path), "--ca-cert", str(owner.pki.ca.cert_path), "--token-file", str(owner.token_file)]
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["sha256"] == owner.sha256 and result["downloaded"] == owner.size
    assert [r["message_type"] for r in result["egress"]["requests"]] == [
        "xkt.v1.GetManifestRequest",
        "xkt.v1.FetchWeightsRequest",
    ]
    assert "egress manifest" in err
    code, out, _ = cli(*args, "--json")
    assert code == 0 and json.loads(out)["cached"] is True


def test_wrong_token_exits_6(owner: OwnerFiles, tls_server: RunningServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad-token"
    bad.write_text("x" * 43)
    bad.chmod(0o600)
    code, out, _ = cli(
        "fetch", "--server", f"127.0.0.1:{tls_server.port}", "--owner-key", str(owner.owner_pub), "--out", str(tmp_path),
        "--ca-cert", str(owner.pki.ca.cert_path), "--token-file", str(bad), "--json",
    )  # fmt: skip
    assert code == 6 and json.loads(out)["error"]["reason"] == "refused-identity"


def test_wrong_owner_key_is_refused_before_any_weights(
    owner: OwnerFiles, tls_server: RunningServer, tmp_path: Path
) -> None:
    """The TLS refusals (CA, names, client certificates, plaintext, ...) are in test_tls_matrix.py."""
    options = token_opts(owner, tls_server.port)
    with pytest.raises(XktError) as info, open_channel(options) as channel:
        fetch_artifact(SourceModelClient(channel, options), [load_public_key(owner.other_pub)], tmp_path)
    assert "not a trusted key" in info.value.message, info.value.message
    assert not any(tmp_path.glob("*.part/weights*"))  # nothing was downloaded


# ------------------------------------------------------------------ resume after SIGKILL


def _serve(owner: OwnerFiles, audit: Path, stderr_to: Path) -> contextlib.AbstractContextManager[ServedProcess]:
    """A real ``xkt-server serve`` (TLS, tokens, smallest chunks, ``audit``); the test may SIGKILL it."""
    flags = (*owner.tls_flags, "--chunk-size", str(MIN_CHUNK_BYTES), "--audit-log", str(audit))
    return serve_subprocess(owner, *flags, stderr_to=stderr_to, expect_exit=None)


def test_sigkill_mid_stream_then_resume(owner: OwnerFiles, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with _serve(owner, audit, tmp_path / "server-1.err") as served:
        killed_at: list[int] = []

        def kill_midway(done: int, total: int) -> None:
            if not killed_at and done >= 4 * MIN_CHUNK_BYTES:
                killed_at.append(done)
                os.kill(served.proc.pid, signal.SIGKILL)

        with pytest.raises(TransportError) as error:
            run_fetch(token_opts(owner, served.port), owner, tmp_path / "cache", progress=kill_midway)
        assert error.value.reason == "stream-interrupted" and "resumes" in error.value.hint  # not a TLS hint
    part = tmp_path / "cache" / f"{owner.sha256}.part" / "weights.safetensors.part"
    held = part.stat().st_size
    assert killed_at and 0 < held < owner.size
    with _serve(owner, audit, tmp_path / "server-2.err") as served:
        result = run_fetch(token_opts(owner, served.port), owner, tmp_path / "cache")
    assert result.resumed_from == held and result.downloaded == owner.size - held < owner.size
    data = (result.path / "weights.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == owner.sha256
    entries = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    sent = [e["bytes_sent"] for e in entries if e["rpc"] == "FetchWeights" and e["outcome"] == "OK"]
    assert sent and sent[-1] == owner.size - held  # the restarted server sent only the missing bytes


# ------------------------------------------------------------------ egress


class CountingProxy(LoopbackProxy):
    """A loopback TCP proxy that counts the bytes the client sends (plaintext mode)."""

    def __init__(self, target_port: int) -> None:
        self.sent = 0
        super().__init__(target_port)

    def client_sent(self, data: bytes) -> None:
        self.sent += len(data)


def test_egress_only_declared_requests(owner: OwnerFiles, tmp_path: Path) -> None:
    with run_server(config(owner, insecure=True, tls_cert=None, tls_key=None)) as running:
        proxy = CountingProxy(running.port)
        try:
            recorded: list[tuple[str, bytes]] = []
            opts = replace(token_opts(owner, proxy.port), ca_cert=None, insecure=True)
            run_fetch(opts, owner, tmp_path, recorded)
        finally:
            proxy.close()
    assert [m for m, _ in recorded] == ["/xkt.v1.SourceModel/GetManifest", "/xkt.v1.SourceModel/FetchWeights"]
    assert pb.GetManifestRequest.FromString(recorded[0][1]).ListFields() == []
    request = pb.FetchWeightsRequest.FromString(recorded[1][1])
    assert (request.sha256, request.offset) == (owner.sha256, 0)
    payload = sum(len(b) for _, b in recorded)
    assert payload <= 80 and proxy.sent < 8 * 1024  # HTTP/2 framing, headers, token; nothing size of data
    assert proxy.sent < owner.size // 100


def test_guard_refuses_undeclared_request(owner: OwnerFiles, tls_server: RunningServer) -> None:
    opts = token_opts(owner, tls_server.port)
    guard = EgressGuard(single_site_manifest(sha256=None, offset=None, token=True))
    with open_channel(opts, [guard]) as channel, pytest.raises(XktError) as info:
        SourceModelClient(channel, opts).get_batchnorm_stats(owner.sha256)  # not declared for a fetch
    assert info.value.reason == "undeclared-egress"


# ------------------------------------------------------------------ doctor


def test_doctor_pass_and_wrong_owner_key(owner: OwnerFiles, tls_server: RunningServer) -> None:
    base = ["doctor", "--server", f"127.0.0.1:{tls_server.port}", "--ca-cert", str(owner.pki.ca.cert_path)]
    base += ["--token-file", str(owner.token_file), "--json"]
    code, out, err = cli(*base, "--owner-key", str(owner.owner_pub))
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 0, (out, err)
    assert [checks[n]["status"] for n in ("reachable", "tls", "identity", "owner-key", "health")] == ["PASS"] * 5
    code, out, _ = cli(*base, "--owner-key", str(owner.other_pub))
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 4 and checks["owner-key"]["status"] == "FAIL" and checks["owner-key"]["fix"]  # verification
