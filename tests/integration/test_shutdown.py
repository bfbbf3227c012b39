"""Graceful shutdown of a real ``xkt-server serve`` process on SIGTERM.

What ``server/serving.py`` promises: on SIGTERM the server stops taking new calls, in-flight
streams get ``--grace`` seconds to finish, and after that they are cancelled (the client
sees gRPC's UNAVAILABLE); the process then exits 0.  The weights
(~11 MB) are larger than what loopback and gRPC flow control buffer for a client that
stops reading (~4 MiB), so the server is genuinely blocked mid-stream when the signal
arrives, and still has megabytes to send.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from xkt.client.channel import ChannelOptions, SourceModelClient, open_channel
from xkt.client.fetch import PART_SUFFIX, fetch_artifact
from xkt.protos import source_model_pb2 as pb
from xkt.protos import source_model_pb2_grpc as pb_grpc
from xkt.server.audit_log import verify_log
from xkt.shared.errors import TransportError
from xkt.shared.grpc_options import MIN_CHUNK_BYTES, client_options
from xkt.shared.models import ArchSpec
from xkt.shared.signing import load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owner_fixtures import BIN, OwnerFiles, make_owner, serve_subprocess  # noqa: E402

ARCH = ArchSpec("resnet_tiny", num_classes=6, kwargs={"width": 48})  # ~11 MB: more than flow control buffers
GRACE_LONG_S = 8.0  # far more than a loopback client needs for the rest
GRACE_SHORT_S = 0.5  # far less than the test client stalls
pytestmark = pytest.mark.timeout(90)


@dataclass(frozen=True)
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    audit: Path


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> OwnerFiles:
    return make_owner(tmp_path_factory.mktemp("shutdown"), arch=ARCH, class_names=list("abcdef"))


@pytest.fixture
def served(owner: OwnerFiles, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    """A real ``xkt-server serve`` whose ``--grace`` is the test's (indirect) parameter; the test stops it."""
    grace = float(request.param)
    folder = tmp_path / "server"
    audit = folder / "audit.jsonl"
    flags = (*owner.tls_flags, "--chunk-size", str(MIN_CHUNK_BYTES), "--audit-log", str(audit))
    with serve_subprocess(owner, *flags, grace_s=grace, stderr_to=folder / "server.err", expect_exit=None) as running:
        assert running.announced["model_sha256"] == owner.sha256
        yield Served(running.proc, running.port, audit)


def _channel(owner: OwnerFiles, port: int) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=owner.pki.ca.cert)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=client_options())


def _bearer(owner: OwnerFiles) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {owner.token}"),)


def _new_call_code(owner: OwnerFiles, port: int, channel: grpc.Channel | None = None) -> grpc.StatusCode:
    """The status of a fresh GetManifest (on a new connection unless ``channel`` is given)."""
    own = channel is None
    channel = channel or _channel(owner, port)
    try:
        pb_grpc.SourceModelStub(channel).GetManifest(pb.GetManifestRequest(), timeout=3, metadata=_bearer(owner))
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    finally:
        if own:
            channel.close()


def _wait_refused(owner: OwnerFiles, port: int, within_s: float) -> float:
    """Seconds until a new call is refused; fails the test if it is still accepted after ``within_s``."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        code = _new_call_code(owner, port)
        if code != grpc.StatusCode.OK:
            assert code == grpc.StatusCode.UNAVAILABLE, code
            return time.monotonic() - start
        time.sleep(0.05)
    pytest.fail(f"new calls were still accepted {within_s} s after SIGTERM")


def _audit_entries(audit: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]


def _cli_audit_verify(audit: Path) -> dict[str, object]:
    """``xkt-server audit verify --json``: the operator's own check of the hash chain."""
    done = subprocess.run(
        [str(BIN / "xkt-server"), "audit", "verify", str(audit), "--json"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ the stream finishes within grace


@pytest.mark.parametrize("served", [GRACE_LONG_S], indirect=True)
def test_sigterm_drains_the_in_flight_stream_then_exits_0(owner: OwnerFiles, served: Served) -> None:
    """SIGTERM refuses new calls at once but lets a slow reader finish: every byte, the signed digest, exit 0."""
    grace = GRACE_LONG_S
    with _channel(owner, served.port) as channel:
        request = pb.FetchWeightsRequest(sha256=owner.sha256, offset=0)
        call = pb_grpc.SourceModelStub(channel).FetchWeights(request, timeout=30, metadata=_bearer(owner))
        chunks = [next(call)]
        time.sleep(0.3)  # the client stops reading: the server blocks on flow control mid-stream
        sigterm_at = time.monotonic()
        os.kill(served.proc.pid, signal.SIGTERM)

        _wait_refused(owner, served.port, within_s=3.0)  # (b) a new connection is refused
        assert _new_call_code(owner, served.port, channel) == grpc.StatusCode.UNAVAILABLE  # and the open one too
        time.sleep(1.0)  # still reading nothing, well inside the grace period
        assert served.proc.poll() is None, "the server exited while a stream was still in flight"

        chunks += list(call)  # (a) the rest of the stream arrives; no RpcError
        finished_at = time.monotonic()
        assert call.code() == grpc.StatusCode.OK
    data = b"".join(c.data for c in chunks)
    assert len(data) == owner.size and hashlib.sha256(data).hexdigest() == owner.sha256
    assert [c.offset for c in chunks] == [sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))]
    assert finished_at - sigterm_at < grace

    assert served.proc.wait(timeout=grace + 5) == 0  # (c)
    assert time.monotonic() - sigterm_at < grace + 5

    check = verify_log(served.audit)  # (d) the completed stream is on record, and the chain holds
    assert check.ok, check
    fetches = [e for e in _audit_entries(served.audit) if e["rpc"] == "FetchWeights"]
    assert [(e["outcome"], e["bytes_sent"], e["site"]) for e in fetches] == [("OK", owner.size, "site-a")]
    assert _cli_audit_verify(served.audit)["entries"] == check.entries


# ------------------------------------------------------------------ the client outlives the grace period


@pytest.mark.parametrize("served", [GRACE_SHORT_S], indirect=True)
def test_stream_stalled_past_grace_is_cancelled_and_never_published(
    owner: OwnerFiles, served: Served, tmp_path: Path
) -> None:
    """A reader slower than the grace period gets a clean UNAVAILABLE, keeps a resumable .part, publishes nothing."""
    grace = GRACE_SHORT_S
    cache = tmp_path / "cache"
    exited: list[int | None] = []
    signalled: list[float] = []

    def stall_after_first_chunk(done: int, total: int) -> None:
        if signalled:
            return
        signalled.append(time.monotonic())
        os.kill(served.proc.pid, signal.SIGTERM)
        try:  # stop reading until the server has given up on us and exited
            exited.append(served.proc.wait(timeout=grace + 10))
        except subprocess.TimeoutExpired:
            exited.append(None)

    opts = ChannelOptions(
        f"127.0.0.1:{served.port}",
        ca_cert=owner.pki.ca.cert_path,
        token=owner.token,
        unary_deadline_s=5.0,
        stream_deadline_s=30.0,
        chunk_idle_s=20.0,  # longer than the stall: the cut must come from the server, not our watchdog
    )
    started = time.monotonic()
    with open_channel(opts) as channel, pytest.raises(TransportError) as info:
        fetch_artifact(
            SourceModelClient(channel, opts), [load_public_key(owner.owner_pub)], cache, stall_after_first_chunk
        )
    assert time.monotonic() - started < grace + 15  # it ended; it did not hang until the stream deadline
    assert exited == [0], "the server did not exit 0 while the client stalled"
    assert info.value.reason == "stream-interrupted", (info.value.reason, info.value.message)  # mid-stream cut

    part_dir = cache / f"{owner.sha256}{PART_SUFFIX}"
    part = part_dir / "weights.safetensors.part"
    held = part.read_bytes()
    assert 0 < len(held) < owner.size
    weights = (owner.model_dir / "weights.safetensors").read_bytes()
    assert held == weights[: len(held)]  # only verified bytes, in order: a valid resume point
    assert not (cache / owner.sha256).exists()  # nothing complete-looking in the cache
    assert not (part_dir / "weights.safetensors").exists()

    check = verify_log(served.audit)
    assert check.ok, check
    fetches = [e for e in _audit_entries(served.audit) if e["rpc"] == "FetchWeights"]
    assert len(fetches) == 1 and fetches[0]["outcome"] == "CANCELLED"
    assert len(held) <= int(fetches[0]["bytes_sent"]) < owner.size  # type: ignore[call-overload]
    assert _cli_audit_verify(served.audit)["entries"] == check.entries
