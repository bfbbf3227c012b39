"""Load test of ``xkt-server serve``: N concurrent sites fetching one signed model over TLS + token.

Usage: python benchmarks/serve_load.py [--clients 32] [--model-mb 48] [--seconds 60]
       [--chunk-size BYTES] [--processes 0] [--json]

What it measures, all in one run on 127.0.0.1:

1. A throw-away owner key, PKI (``init_pki``), token file and a real signed artifact of at
   least ``--model-mb`` MB (a ``resnet_tiny`` whose width is chosen to reach that size, or
   ``--arch resnet18``) are created in a temporary folder.
2. A real ``xkt-server serve --json`` subprocess serves it (TLS + bearer token); its VmRSS
   is sampled from ``/proc/<pid>/status`` every ``--rss-interval`` seconds.
3. ``--clients`` clients, each on its own channel, alternate two calls until ``--seconds``
   have passed, through the product's client code: a GetManifest round trip on its own
   (timed alone: the manifest latency a site sees while the others download), then a whole
   fetch: GetManifest, Ed25519 check of the manifest, FetchWeights stream with every chunk
   checked (offset, size, sha256) and the whole-file sha256 compared with the signed digest.
   Clients are threads of this process (``--processes 0``) or threads spread over that
   many worker processes (the GIL of one process can cap the client side).
4. The server's health is checked after the load, then it gets SIGTERM (SIGKILL after 10 s).
5. The same number of bytes is copied over raw loopback TCP sockets (one connection per
   client, the weights file written again and again) for the machine's raw loopback rate.

How to read it: ``errors`` (fetches and manifest calls) must be 0; ``rss_growth_ratio`` =
(peak VmRSS during the load - VmRSS before it) / model size must stay below 2, i.e. the
server's RSS is bounded by its idle RSS + 2 x the model size whatever the number of clients
(it streams from disk and must not hold a copy of the model per client); ``ratio_to_raw`` = xkt aggregate MB/s / raw socket
MB/s is the share of the loopback's capacity that TLS, HTTP/2, protobuf and both sides'
sha256 leave (expect a small fraction on few cores: every byte is encrypted, hashed twice
and decrypted).  Latency p50/p99 is per complete fetch (``latency_*``) and per GetManifest
round trip (``manifest_latency_*``); with more clients than server worker threads (8) the
excess calls queue, which shows up in p99, not as errors.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

MB = 1_000_000
MIN_ACCEPTED_MB = 40.0
"""The acceptance item asks for a model of at least this many MB."""


@dataclass(frozen=True)
class Setup:
    """The throw-away owner side: model, keys, PKI and token, all under ``root``."""

    root: Path
    model_dir: Path
    owner_pub: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    tokens: Path
    token: str
    weights: Path
    size: int
    sha256: str
    arch: str


@dataclass(frozen=True)
class ClientJob:
    """What one batch of client threads needs (picklable, for worker processes)."""

    server: str
    ca_cert: str
    token: str
    owner_pub: str
    deadline: float  # time.time() after which no new fetch starts
    threads: int


FETCH, MANIFEST = "fetch", "manifest"


@dataclass(frozen=True)
class Outcome:
    """One call: when it started and ended (time.time()), bytes verified, error text, and its kind.

    ``kind`` is FETCH (a whole verified download) or MANIFEST (one GetManifest round trip).
    """

    start: float
    end: float
    nbytes: int
    error: str | None
    kind: str = FETCH


# ------------------------------------------------------------------ the owner side


def _resnet_tiny_width(target_bytes: int) -> int:
    """The smallest even resnet_tiny width whose float32 weights reach ``target_bytes``."""
    from xkt.shared.models import ArchSpec, build_model

    width = 4
    while width < 1024:
        model = build_model(ArchSpec("resnet_tiny", num_classes=10, kwargs={"width": width}), device="meta")
        if sum(t.numel() * t.element_size() for t in model.state_dict().values()) >= target_bytes:
            return width
        width += 2
    raise ValueError(f"no resnet_tiny width reaches {target_bytes} bytes")


def make_setup(root: Path, model_mb: float, arch: str) -> Setup:
    """Owner key, PKI, token and a signed artifact (``save_artifact``) under ``root``."""
    import torch

    from xkt.server.auth import add_token
    from xkt.server.provision import init_pki
    from xkt.shared.artifact import InputSpec, save_artifact
    from xkt.shared.models import ArchSpec, build_model
    from xkt.shared.signing import generate_keypair, load_private_key

    key, pub = generate_keypair(root / "keys")
    kwargs = {"width": _resnet_tiny_width(int(model_mb * MB))} if arch == "resnet_tiny" else {}
    spec = ArchSpec(arch, num_classes=10, kwargs=kwargs)
    torch.manual_seed(0)
    save_artifact(
        build_model(spec).eval(),
        out_dir=root / "model",
        private_key=load_private_key(key),
        model_id="serve-load",
        model_version="1",
        arch=spec,
        class_names=[f"c{i}" for i in range(10)],
        input_spec=InputSpec("rgb", 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        provenance={"trainer": "benchmarks/serve_load.py"},
    )
    pki = init_pki(root / "pki")
    token = add_token(root / "tokens.txt", "load-site")
    weights = root / "model" / "weights.safetensors"
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        while block := handle.read(MB):
            digest.update(block)
    label = f"{arch}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    return Setup(
        root,
        root / "model",
        pub,
        pki.ca_cert,
        pki.server_cert,
        pki.server_key,
        root / "tokens.txt",
        token,
        weights,
        weights.stat().st_size,
        digest.hexdigest(),
        label,
    )


# ------------------------------------------------------------------ the server process


def _server_exe() -> list[str]:
    """The installed ``xkt-server`` next to this interpreter, else the module's entry point."""
    exe = Path(sys.executable).parent / "xkt-server"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("xkt-server")
    return [found] if found else [sys.executable, "-c", "from xkt.server.cli import main; main()"]


@contextlib.contextmanager
def serve(
    setup: Setup, chunk_size: int | None, startup_s: float = 120.0
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Start ``xkt-server serve --json`` (TLS + token), yield (process, port), stop it with SIGTERM."""
    args = [*_server_exe(), "serve", "--model", str(setup.model_dir), "--owner-key", str(setup.owner_pub)]
    args += ["--listen", "127.0.0.1:0", "--tls-cert", str(setup.server_cert), "--tls-key", str(setup.server_key)]
    args += ["--tokens", str(setup.tokens), "--json", "--grace", "1"]
    if chunk_size is not None:
        args += ["--chunk-size", str(chunk_size)]
    with (setup.root / "server.stderr").open("w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], startup_s)
        line = proc.stdout.readline() if ready else ""
        if not line:
            tail = (setup.root / "server.stderr").read_text()[-2000:]
            raise RuntimeError(f"xkt-server serve did not announce itself: {tail}")
        announced = json.loads(line)
        if not announced.get("ok") or not str(announced.get("listen", "")).startswith("127.0.0.1:"):
            raise RuntimeError(f"unexpected announcement from xkt-server serve: {line.strip()}")
        yield proc, int(announced["port"])
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen[str], wait_s: float = 10.0) -> int:
    """SIGTERM, wait ``wait_s``, then SIGKILL by PID; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=wait_s)


def read_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes, from /proc/<pid>/status."""
    values = {"VmRSS": 0, "VmHWM": 0}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in values:
                values[name] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


class RssSampler:
    """A daemon thread sampling VmRSS of one process every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append(read_rss(self.pid)[0])
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------ the clients


def _one_fetch(client: Any, owner_keys: list[Any]) -> int:
    """GetManifest, verify it, stream the weights with every check; returns the bytes verified."""
    from xkt.client.fetch import check_chunk, verify_manifest_message

    manifest = verify_manifest_message(client.get_manifest(), owner_keys)
    size, sha = manifest.weights.size, manifest.weights.sha256
    digest, position = hashlib.sha256(), 0
    for chunk in client.fetch_weights(sha, 0):
        check_chunk(chunk, position, size)  # offset, bounds and the chunk's own sha256
        digest.update(chunk.data)
        position += len(chunk.data)
    if position != size or digest.hexdigest() != sha:
        raise RuntimeError(f"whole-file check failed: {position} of {size} bytes, digest {digest.hexdigest()[:12]}")
    return position


def _timed(kind: str, call: Callable[[], int]) -> Outcome:
    """Run ``call`` (returning the bytes it verified) and record it; any exception becomes an error outcome."""
    start = time.time()
    try:
        nbytes = call()
    except Exception as error:  # every failure counts, whatever its kind
        return Outcome(start, time.time(), 0, f"{type(error).__name__}: {str(error)[:200]}", kind)
    return Outcome(start, time.time(), nbytes, None, kind)


def _client_loop(job: ClientJob, out: list[Outcome]) -> None:
    """One site: its own channel, alternating a lone GetManifest and a whole fetch until the deadline."""
    from xkt.client.channel import ChannelOptions, SourceModelClient, open_channel
    from xkt.shared.signing import load_public_key

    opts = ChannelOptions(job.server, ca_cert=Path(job.ca_cert), token=job.token)
    keys = [load_public_key(Path(job.owner_pub))]
    with open_channel(opts) as channel:
        client = SourceModelClient(channel, opts)
        while time.time() < job.deadline:
            for outcome in (
                _timed(MANIFEST, lambda: len(client.get_manifest().SerializeToString())),
                _timed(FETCH, lambda: _one_fetch(client, keys)),
            ):
                out.append(outcome)
                if outcome.error is not None:
                    time.sleep(0.2)  # a refused server must not turn the loop into a busy spin


def run_clients(job: ClientJob) -> tuple[list[Outcome], float]:
    """``job.threads`` client threads in this process; (all their outcomes, this process's CPU seconds)."""
    cpu0 = time.process_time()
    outcomes: list[list[Outcome]] = [[] for _ in range(job.threads)]
    threads = [threading.Thread(target=_client_loop, args=(job, out), daemon=True) for out in outcomes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [o for out in outcomes for o in out], time.process_time() - cpu0


def run_load(job: ClientJob, clients: int, processes: int) -> tuple[list[Outcome], float]:
    """``clients`` clients as threads here (``processes`` 0) or spread over worker processes.

    Returns every outcome and the client side's total CPU seconds: near 1 s per wall second
    with ``processes`` 0 means the GIL, not the server, limits the clients.
    """
    if processes <= 0:
        return run_clients(ClientJob(**{**asdict(job), "threads": clients}))
    processes = min(processes, clients)
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_clients, ClientJob(**{**asdict(job), "threads": n})) for n in shares]
        results = [f.result() for f in futures]
    return [o for outcomes, _ in results for o in outcomes], sum(cpu for _, cpu in results)


def check_health(port: int, setup: Setup) -> str:
    """The SourceModel health status name as a fresh client sees it, or the error's text."""
    from xkt.client.channel import ChannelOptions, SourceModelClient, open_channel

    opts = ChannelOptions(f"127.0.0.1:{port}", ca_cert=setup.ca_cert, token=setup.token)
    try:
        with open_channel(opts) as channel:
            return SourceModelClient(channel, opts).health()
    except Exception as error:
        return f"error: {type(error).__name__}: {str(error)[:200]}"


# ------------------------------------------------------------------ the raw loopback baseline


def raw_loopback_copy(data: bytes, connections: int, total_bytes: int) -> tuple[int, float]:
    """Copy ``data`` repeatedly over ``connections`` loopback TCP sockets; (bytes moved, seconds).

    Senders ``sendall`` the whole file, receivers ``recv_into`` a 1 MiB buffer; both release
    the GIL, so threads of one process measure the kernel's loopback, not Python.
    """
    repeats = max(1, math.ceil(total_bytes / (connections * len(data))))
    per_conn = repeats * len(data)
    view = memoryview(data)
    with socket.create_server(("127.0.0.1", 0), backlog=connections) as listener:
        port = listener.getsockname()[1]
        receivers = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
        senders = [listener.accept()[0] for _ in range(connections)]
    received = [0] * connections
    go = threading.Barrier(2 * connections + 1)

    def send(sock: socket.socket) -> None:
        go.wait()
        for _ in range(repeats):
            sock.sendall(view)
        sock.shutdown(socket.SHUT_WR)

    def receive(i: int, sock: socket.socket) -> None:
        buffer = bytearray(1 << 20)
        go.wait()
        while n := sock.recv_into(buffer):
            received[i] += n

    threads = [threading.Thread(target=send, args=(s,)) for s in senders]
    threads += [threading.Thread(target=receive, args=(i, s)) for i, s in enumerate(receivers)]
    for thread in threads:
        thread.start()
    go.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    for sock in senders + receivers:
        sock.close()
    if sum(received) != per_conn * connections:
        raise RuntimeError(f"raw copy moved {sum(received)} bytes, expected {per_conn * connections}")
    return sum(received), elapsed


# ------------------------------------------------------------------ the run


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(outcomes: list[Outcome], load_start: float) -> dict[str, Any]:
    """Counts, errors (count and up to five distinct texts, both kinds), latencies and fetch throughput.

    Throughput counts the weights bytes of complete fetches only; the manifest calls' own
    latency is reported beside the fetches' (``manifest_*``), never mixed into it.
    """
    fetches = [o for o in outcomes if o.kind == FETCH]
    manifests = [o for o in outcomes if o.kind == MANIFEST]
    done = [o for o in fetches if o.error is None]
    answered = [o for o in manifests if o.error is None]
    failed = [o for o in outcomes if o.error is not None]
    total = sum(o.nbytes for o in done)
    first = min((o.start for o in outcomes), default=load_start)  # worker processes start late
    wall = max((o.end for o in outcomes), default=first) - first
    return {
        "fetches": len(done),
        "manifest_calls": len(answered),
        "errors": len(failed),
        "error_samples": sorted({f"{o.kind}: {o.error}" for o in failed})[:5],
        "bytes": total,
        "load_wall_s": round(wall, 3),
        **latency_summary("latency", done),
        **latency_summary("manifest_latency", answered),
        "throughput_mb_s": round(total / MB / wall, 1) if wall > 0 else 0.0,
    }


def latency_summary(prefix: str, outcomes: list[Outcome]) -> dict[str, float]:
    """``{prefix}_p50_s``, ``_p99_s`` and ``_max_s`` of the outcomes' durations, in seconds."""
    durations = [o.end - o.start for o in outcomes]
    return {
        f"{prefix}_p50_s": round(percentile(durations, 0.50), 4),
        f"{prefix}_p99_s": round(percentile(durations, 0.99), 4),
        f"{prefix}_max_s": round(max(durations, default=0.0), 4),
    }


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Set up, serve, load, check health, stop, copy raw bytes; the result dictionary."""
    setup = make_setup(root, args.model_mb, args.arch)
    with serve(setup, args.chunk_size) as (proc, port):
        if (status := check_health(port, setup)) != "SERVING":
            raise RuntimeError(f"server not healthy before the load: {status}")
        time.sleep(0.5)
        rss_before, hwm_before = read_rss(proc.pid)
        cpu_before = cpu_seconds(proc.pid)
        job = ClientJob(
            f"127.0.0.1:{port}", str(setup.ca_cert), setup.token, str(setup.owner_pub), time.time() + args.seconds, 0
        )
        with RssSampler(proc.pid, args.rss_interval) as sampler:
            load_start = time.time()
            outcomes, client_cpu = run_load(job, args.clients, args.processes)
        rss_after, hwm_after = read_rss(proc.pid)
        server_cpu = cpu_seconds(proc.pid) - cpu_before
        health_after = check_health(port, setup)
    exit_status = proc.returncode
    load = summarize(outcomes, load_start)
    peak = max([*sampler.samples, rss_after])
    raw_bytes, raw_s = raw_loopback_copy(setup.weights.read_bytes(), args.clients, max(load["bytes"], setup.size))
    raw_mb_s = raw_bytes / MB / raw_s
    growth = (peak - rss_before) / setup.size
    return {
        "clients": args.clients,
        "client_mode": f"{args.processes} processes x threads" if args.processes > 0 else "threads in one process",
        "seconds": args.seconds,
        "chunk_size": args.chunk_size,
        "model": {"arch": setup.arch, "bytes": setup.size, "mb": round(setup.size / MB, 2), "sha256": setup.sha256},
        **load,
        "raw_bytes": raw_bytes,
        "raw_wall_s": round(raw_s, 3),
        "raw_mb_s": round(raw_mb_s, 1),
        "ratio_to_raw": round(load["throughput_mb_s"] / raw_mb_s, 4) if raw_mb_s > 0 else 0.0,
        "server": {
            "rss_before_mb": round(rss_before / MB, 1),
            "rss_peak_mb": round(peak / MB, 1),
            "rss_after_mb": round(rss_after / MB, 1),
            "hwm_before_mb": round(hwm_before / MB, 1),
            "hwm_after_mb": round(hwm_after / MB, 1),
            "rss_samples": len(sampler.samples),
            "cpu_s_during_load": round(server_cpu, 1),
            "exit_status": exit_status,
        },
        "rss_growth_ratio": round(growth, 3),
        "health_after": health_after,
        "client_cpu_s": round(client_cpu, 1),
        "cpus": os.cpu_count(),
    }


def verdict(result: dict[str, Any]) -> dict[str, bool]:
    """The acceptance item, check by check."""
    return {
        "model_at_least_40mb": result["model"]["bytes"] >= MIN_ACCEPTED_MB * MB,
        "no_errors": result["errors"] == 0 and result["fetches"] > 0 and result["manifest_calls"] > 0,
        "rss_growth_below_2x": result["rss_growth_ratio"] < 2.0,
        "healthy_after": result["health_after"] == "SERVING",
        "server_stopped_cleanly": result["server"]["exit_status"] == 0,
    }


def print_table(result: dict[str, Any]) -> None:
    """The human summary on stderr."""
    from rich.console import Console
    from rich.table import Table

    server = result["server"]
    table = Table(title=f"xkt-server serve under load ({result['client_mode']}, {result['cpus']} CPUs)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("clients", str(result["clients"])),
        ("model", f"{result['model']['arch']}, {result['model']['mb']} MB"),
        (
            "complete fetches / manifest calls / errors",
            f"{result['fetches']} / {result['manifest_calls']} / {result['errors']}",
        ),
        (
            "fetch latency p50 / p99 / max",
            f"{result['latency_p50_s']} / {result['latency_p99_s']} / {result['latency_max_s']} s",
        ),
        (
            "GetManifest latency p50 / p99 / max",
            f"{result['manifest_latency_p50_s'] * 1000:.1f} / {result['manifest_latency_p99_s'] * 1000:.1f}"
            f" / {result['manifest_latency_max_s'] * 1000:.1f} ms",
        ),
        ("xkt aggregate throughput", f"{result['throughput_mb_s']} MB/s over {result['load_wall_s']} s"),
        ("raw loopback socket copy", f"{result['raw_mb_s']} MB/s ({result['raw_bytes'] / MB:.0f} MB)"),
        ("ratio xkt / raw", f"{result['ratio_to_raw']:.4f}"),
        (
            "server RSS before / peak / after",
            f"{server['rss_before_mb']} / {server['rss_peak_mb']} / {server['rss_after_mb']} MB",
        ),
        ("RSS growth / model size", f"{result['rss_growth_ratio']} (bound: peak < before + 2 x model size)"),
        ("CPU during load: server / clients", f"{server['cpu_s_during_load']} / {result['client_cpu_s']} s"),
        ("health after load", result["health_after"]),
        ("server exit status (SIGTERM)", str(server["exit_status"])),
    ]
    rows += [(f"pass: {name}", "yes" if ok else "NO") for name, ok in result["acceptance"].items()]
    for name, value in rows:
        table.add_row(name, value)
    console = Console(stderr=True)
    console.print(table)
    for sample in result["error_samples"]:
        console.print(f"[red]error:[/red] {sample}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, run everything in a temporary folder, print and return the result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--model-mb", type=float, default=48.0, help="resnet_tiny width is chosen to reach this size")
    ap.add_argument("--arch", choices=("resnet_tiny", "resnet18", "mobilenet_v2"), default="resnet_tiny")
    ap.add_argument("--seconds", type=float, default=60.0, help="no new fetch starts after this")
    ap.add_argument("--chunk-size", type=int, default=None, help="server chunk size in bytes (default: the server's)")
    ap.add_argument("--processes", type=int, default=0, help="client worker processes; 0 = threads in this process")
    ap.add_argument("--rss-interval", type=float, default=0.05, help="seconds between server RSS samples")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        ap.error("--clients must be at least 1 and --seconds positive")
    with tempfile.TemporaryDirectory(prefix="xkt-serve-load-") as tmp:
        result = measure(args, Path(tmp))
    result["acceptance"] = verdict(result)
    print_table(result)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if all(outcome["acceptance"].values()) else 1)
