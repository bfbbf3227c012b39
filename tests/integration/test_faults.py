"""Fault injection: a process killed, a disk full, a link cut; afterwards no data is lost.

Each test breaks something real at the worst moment and then checks the promise that
matters to a site: what it ends up with is complete and verified, or clearly partial.

* **Server SIGKILLed mid-stream**: proven in test_fetch.py
  (``test_sigkill_mid_stream_then_resume``): a real ``xkt-server serve`` is SIGKILLed
  while a weight stream is in flight, the restarted server sends only the missing
  bytes, and the resumed file's sha256 equals the signed digest.  Not repeated here.
* **Client SIGKILLed mid-adaptation**: ``xkt-client adapt`` (a real process) is
  SIGKILLed as soon as its first epoch checkpoint exists; ``--resume`` then finishes,
  and its accuracy on the site's eval labels equals the uninterrupted run's (same
  seed) within 0.5 points.
* **Disk full while writing**: a tmpfs of a few dozen KiB, mounted in a private mount
  namespace (``unshare -m``: nobody else sees it), holds the fetch cache, the adapt
  output, or the adapt checkpoints.  Each command fails with exit 3 and reason
  ``disk-full``, no folder holds a complete-looking artifact (manifest.json +
  manifest.sig + weights.safetensors), partial files are ``*.part`` or gone; once the
  tmpfs is enlarged the same command (``--resume`` for adapt) completes and verifies.
* **Network cut between site and owner**: two network namespaces joined by a veth cable
  (10.78.0.0/24, limited to 40 Mbit/s so the download takes seconds); a quarter into a
  real ``xkt-client fetch`` the site's cable is pulled and its connection torn down
  (``ss -K``, as a NAT or firewall would), and plugged back 3 s later.  The same fetch
  waits for the link, resumes from the bytes it holds (the server's audit log shows a
  second stream that sent only the rest) and verifies the signed digest.
* **SuperLink restart**: the SuperLink (TLS, SuperNode authentication, ``--database``)
  is SIGKILLed while two sites' SuperNodes are connected, then started again with the
  same command (port, database, certificates).  The SuperNodes reconnect by themselves
  and the next round is answered by both, under the node ids they had before.  What is
  *not* covered: a SuperLink killed in the middle of a run.  ``xkt-server federate``
  then fails (``flwr run`` loses its log stream); continuing that run needs the owner
  command to supervise and restart its SuperLink (server/superlink.py,
  server/federation_runner.py: out of this file's reach).

Model servers run in-process on 127.0.0.1 port 0 (``run_server``) or as real
``xkt-server serve`` processes; clients are real subprocesses; everything started is
stopped by its own PID.  The tmpfs and the namespaces need root (skipped with the
reason otherwise).  About 2.5 minutes in all, most of it Flower's polling.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from xkt.server.federated_server import FederationConfig
from xkt.server.federation_runner import stream_run, write_run_config
from xkt.server.serving import run_server
from xkt.server.superlink import CONNECTION, SuperLink, SuperLinkConfig, flwr, register_site
from xkt.shared.artifact import MANIFEST_FILE, SIGNATURE_FILE, WEIGHTS_FILE, verify_artifact
from xkt.shared.data import IMAGENET_MEAN, IMAGENET_STD
from xkt.shared.models import ArchSpec
from xkt.shared.shapes_benchmark import ShapesConfig, write_shapes_benchmark
from xkt.shared.signing import generate_keypair, load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from federation_fixtures import Federation, make_federation, make_site, start_join, stop_all  # noqa: E402
from owner_fixtures import BIN, OwnerFiles, make_owner  # noqa: E402

ARCH = ArchSpec("resnet_tiny", num_classes=6, kwargs={"width": 8})
CLASSES = ["box", "capsule", "cone", "cylinder", "sphere", "torus"]  # the shapes benchmark's classes
ADAPT = ["--method", "shot", "--epochs", "4", "--set", "batch_size=16", "--set", "seed=0", "--set", "threads=1"]
COMMAND_TIMEOUT_S = 180
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="a private tmpfs needs root and util-linux's unshare/nsenter",
)


@dataclass(frozen=True)
class World:
    """A tiny depth site and the owner's server (TLS + token) on loopback."""

    root: Path
    site: Path
    owner: OwnerFiles
    port: int
    site_key: Path
    site_pub: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("faults")
    write_shapes_benchmark(root / "data", ShapesConfig(seed=0, size=32, per_class=2, site_per_class=8))
    owner = make_owner(
        root, arch=ARCH, class_names=CLASSES, mean=IMAGENET_MEAN, std=IMAGENET_STD, provenance={"kind": "source"}
    )
    site_key, site_pub = generate_keypair(root / "site-keys", "site")
    with run_server(owner.serve_config()) as running:
        yield World(root, root / "data" / "depth", owner, running.port, site_key, site_pub)


def client(world: World, command: str, *args: str) -> list[str]:
    """``xkt-client COMMAND`` against the world's server over TLS with the site's token, ``--json``."""
    owner = world.owner
    base = [
        str(BIN / "xkt-client"),
        command,
        "--server",
        f"127.0.0.1:{world.port}",
        "--owner-key",
        str(owner.owner_pub),
    ]
    return [*base, "--ca-cert", str(owner.pki.ca.cert_path), "--token-file", str(owner.token_file), *args, "--json"]


def adapt_args(world: World, out: Path, cache: Path, *extra: str) -> list[str]:
    site = ["--site", str(world.site), "--site-key", str(world.site_key), "--out", str(out), "--cache", str(cache)]
    return client(world, "adapt", *site, *extra, "-q")


def run_json(args: list[str], prefix: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.stdout.strip(), (done.returncode, done.stderr[-3000:])
    return done.returncode, json.loads(done.stdout)


def accuracy_after(out: Path) -> float:
    return float(json.loads((out / "report.json").read_text())["accuracy"]["after"]["accuracy"])


def complete_artifacts(folder: Path) -> list[Path]:
    """Folders under ``folder`` that hold the whole trio an artifact is made of (whether it verifies or not)."""
    trio = {MANIFEST_FILE, SIGNATURE_FILE, WEIGHTS_FILE}
    return [d for d in (folder, *folder.rglob("*")) if d.is_dir() and trio <= {p.name for p in d.iterdir()}]


# ------------------------------------------------------------------ client SIGKILL mid-adaptation


def _wait_for_checkpoint(proc: subprocess.Popen[bytes], latest: Path, timeout_s: float) -> int:
    """The epoch of the first checkpoint ``proc`` publishes (polled; latest.json is replaced atomically)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return int(json.loads(latest.read_text())["epoch"])
        time.sleep(0.02)
    pytest.fail(f"no checkpoint within {timeout_s} s (exit {proc.poll()})")


def test_client_sigkill_mid_adaptation_then_resume_matches_the_uninterrupted_run(world: World, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code, straight = run_json(adapt_args(world, tmp_path / "straight", cache, *ADAPT))
    assert code == 0, straight

    out = tmp_path / "killed"
    proc = subprocess.Popen(adapt_args(world, out, cache, *ADAPT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        epoch = _wait_for_checkpoint(proc, tmp_path / "killed.ckpt" / "latest.json", COMMAND_TIMEOUT_S)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and 1 <= epoch < 4, (proc.returncode, epoch)
    assert not out.exists() and not complete_artifacts(tmp_path / "killed.ckpt")  # nothing published

    code, resumed = run_json(adapt_args(world, out, cache, *ADAPT, "--resume"))
    assert code == 0, resumed
    report = json.loads((out / "report.json").read_text())
    assert [entry["epoch"] for entry in report["label_free"]["history"]] == [1, 2, 3, 4]
    verify_artifact(out, [load_public_key(world.site_pub)])
    difference = abs(accuracy_after(out) - accuracy_after(tmp_path / "straight")) * 100
    assert difference <= 0.5, f"resumed run is {difference:.2f} points off the uninterrupted one"


# ------------------------------------------------------------------ disk full


@dataclass(frozen=True)
class SmallDisk:
    """A tmpfs at ``mount`` that only the namespace of ``holder`` (a sleeping process) sees."""

    holder: subprocess.Popen[bytes]
    mount: Path

    @property
    def enter(self) -> tuple[str, ...]:
        """Command prefix that runs a program inside the namespace."""
        return ("nsenter", "-t", str(self.holder.pid), "-m", "--")

    def path(self, inside: Path) -> Path:
        """How this process reads ``inside`` (a path under the mount) through the holder's root."""
        return Path(f"/proc/{self.holder.pid}/root") / inside.relative_to("/")

    def resize(self, kib: int) -> None:
        command = [*self.enter, "mount", "-o", f"remount,size={kib}k", str(self.mount)]
        subprocess.run(command, check=True, capture_output=True, timeout=30)


def _first_line(proc: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    return os.read(proc.stdout.fileno(), 64) if ready else b""


@contextlib.contextmanager
def small_disk(mount: Path, kib: int) -> Iterator[SmallDisk]:
    """Mount a ``kib`` KiB tmpfs at ``mount`` in a private mount namespace; gone when the holder is killed."""
    mount.mkdir(parents=True)
    script = f"mount -t tmpfs -o size={kib}k xkt-faults {mount} && echo mounted && exec sleep 600"
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        if not _first_line(holder, 10).startswith(b"mounted"):
            holder.kill()
            _, err = holder.communicate(timeout=10)
            pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {err.decode(errors='replace')}")
        yield SmallDisk(holder, mount)
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        for stream in (holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()


def _half_of(world: World) -> int:
    """KiB for a tmpfs that holds about half of the weights."""
    return max(16, world.owner.size // 2048)


@needs_root
def test_full_disk_during_fetch_keeps_a_partial_download_that_resumes(world: World, tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", _half_of(world)) as disk:
        cache = disk.mount / "cache"
        code, result = run_json(client(world, "fetch", "--out", str(cache), "-q"), disk.enter)
        assert code == 3 and result["error"]["reason"] == "disk-full", result
        assert "no space left" in result["error"]["message"], result
        seen = disk.path(cache)
        assert not complete_artifacts(seen) and not (seen / world.owner.sha256).exists()
        part = seen / f"{world.owner.sha256}.part" / f"{WEIGHTS_FILE}.part"
        held = part.stat().st_size
        assert 0 < held < world.owner.size  # clearly partial, and kept for the next fetch
        assert sorted(p.name for p in part.parent.iterdir()) == [MANIFEST_FILE, SIGNATURE_FILE, part.name]

        disk.resize(4 * world.owner.size // 1024)
        code, result = run_json(client(world, "fetch", "--out", str(cache), "-q"), disk.enter)
        assert code == 0 and result["resumed_from"] == held, result
        verify_artifact(seen / world.owner.sha256, [load_public_key(world.owner.owner_pub)])  # the right digest


@needs_root
@pytest.mark.parametrize(
    ("method", "fails_at"),
    [("source-only", "the adapted model"), ("shot", "the epoch-1 checkpoint")],
    ids=["publish", "checkpoint"],
)
def test_full_disk_during_adapt_publishes_nothing_half_written(
    world: World, tmp_path: Path, method: str, fails_at: str
) -> None:
    cache = tmp_path / "cache"  # the source model is fetched to a roomy disk; only OUT is small
    args = ["--method", method, "--epochs", "1", "--set", "batch_size=16", "--set", "threads=1"]
    with small_disk(tmp_path / "disk", _half_of(world)) as disk:
        out = disk.mount / "out"
        code, result = run_json(adapt_args(world, out, cache, *args), disk.enter)
        assert code == 3 and result["error"]["reason"] == "disk-full", result
        assert fails_at in result["error"]["message"] and "no space left" in result["error"]["message"], result
        seen = disk.path(disk.mount)
        assert not complete_artifacts(seen) and not (seen / "out").exists() and not list(seen.glob(".out.*"))
        leftovers = sorted(str(p.relative_to(seen)) for p in seen.rglob("*") if p.is_file())
        assert not any(name.endswith(".safetensors") for name in leftovers), leftovers  # half-written files removed

        disk.resize(16 * world.owner.size // 1024)
        code, result = run_json(adapt_args(world, out, cache, *args, "--resume"), disk.enter)
        assert code == 0, result
        verify_artifact(disk.path(out), [load_public_key(world.site_pub)])


# ------------------------------------------------------------------ a network cut between site and owner (root)

NET = "10.78.0"  # not test_multihost's 10.77.0.0/24, so both can run at once
OWNER_IP, SITE_IP, LAN_PORT = f"{NET}.1", f"{NET}.2", 8443
BIG_ARCH = ArchSpec("resnet_tiny", num_classes=6, kwargs={"width": 48})  # ~11 MB: seconds on a 40 Mbit/s link
needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("ss") is None or shutil.which("tc") is None,
    reason="network namespaces, veth, tc and `ss -K` need root and iproute2",
)


def _ip(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


@pytest.fixture
def link(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Two hosts joined by one veth cable (owner 10.78.0.1, site 10.78.0.2), the owner's side at 40 Mbit/s."""
    tag = os.urandom(3).hex()
    hosts = {"owner": f"xkt-f{tag}-owner", "site": f"xkt-f{tag}-site"}
    created: list[str] = []
    try:
        for name in hosts.values():
            _ip("ip", "netns", "add", name)
            created.append(name)
            _ip("ip", "-n", name, "link", "set", "lo", "up")
        _ip(
            "ip",
            "-n",
            hosts["owner"],
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            hosts["site"],
        )
        for host, address in (("owner", OWNER_IP), ("site", SITE_IP)):
            _ip("ip", "-n", hosts[host], "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("ip", "-n", hosts[host], "link", "set", "eth0", "up")
        _ip("ip", "netns", "exec", hosts["owner"], "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
            "rate", "40mbit", "burst", "64kb", "latency", "200ms")  # fmt: skip
    except RuntimeError as error:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        pytest.skip(f"this kernel or container does not allow namespaces with veth and tc: {error}")
    try:
        yield hosts
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def big_owner(tmp_path_factory: pytest.TempPathFactory) -> OwnerFiles:
    owner = make_owner(tmp_path_factory.mktemp("faults-lan"), arch=BIG_ARCH, class_names=CLASSES)
    lan = owner.pki.ca.issue("lan-server", "xkt-server", ips=(OWNER_IP,), server=True)
    lan.key_path.chmod(0o600)
    return owner


def _read_json_line(proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline, line = time.monotonic() + timeout_s, b""
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
    return dict(json.loads(line)) if line.strip() else {}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM our own process by its PID, SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def _wait_for_bytes(path: Path, at_least: int, proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(FileNotFoundError):
            if (size := path.stat().st_size) >= at_least:
                return size
        time.sleep(0.02)
    pytest.fail(f"{path} did not reach {at_least} bytes within {timeout_s} s (fetch exit {proc.poll()})")


@needs_netns
def test_network_cut_during_fetch_resumes_to_the_right_digest(
    link: dict[str, str], big_owner: OwnerFiles, tmp_path: Path
) -> None:
    owner, run_on = big_owner, lambda host: ["ip", "netns", "exec", link[host]]
    lan_cert, lan_key = owner.pki.ca.folder / "lan-server.pem", owner.pki.ca.folder / "lan-server.key"
    audit = tmp_path / "audit.jsonl"
    serve = [*run_on("owner"), str(BIN / "xkt-server"), "serve", "--model", str(owner.model_dir)]
    serve += ["--owner-key", str(owner.owner_pub), "--listen", f"{OWNER_IP}:{LAN_PORT}", "--tokens", str(owner.tokens)]
    serve += ["--tls-cert", str(lan_cert), "--tls-key", str(lan_key), "--chunk-size", "65536"]
    serve += ["--audit-log", str(audit), "--grace", "0.5", "--json"]
    server = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    fetch: subprocess.Popen[bytes] | None = None
    try:
        assert _read_json_line(server, 60).get("ok") is True
        cache = tmp_path / "cache"
        fetch = subprocess.Popen(
            [*run_on("site"), str(BIN / "xkt-client"), "fetch", "--server", f"{OWNER_IP}:{LAN_PORT}",
             "--owner-key", str(owner.owner_pub), "--ca-cert", str(owner.pki.ca.cert_path),
             "--token-file", str(owner.token_file), "--out", str(cache), "--attempts", "3", "--json", "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        part = cache / f"{owner.sha256}.part" / f"{WEIGHTS_FILE}.part"
        held = _wait_for_bytes(part, owner.size // 4, fetch, 60)
        # The cut: the site's cable is pulled and its connection torn down, as a NAT or firewall would.
        _ip("ip", "-n", link["site"], "link", "set", "eth0", "down")
        _ip(*run_on("site"), "ss", "-K", "dst", OWNER_IP)
        time.sleep(3)
        _ip("ip", "-n", link["site"], "link", "set", "eth0", "up")
        stdout, stderr = fetch.communicate(timeout=COMMAND_TIMEOUT_S)
        assert fetch.returncode == 0, stderr.decode(errors="replace")[-3000:]
        result = json.loads(stdout)
    finally:
        for proc in (fetch, server):
            if proc is not None:
                _stop(proc)
    assert held < owner.size and result["sha256"] == owner.sha256
    verify_artifact(cache / owner.sha256, [load_public_key(owner.owner_pub)])  # the signed digest, byte for byte
    streams = [json.loads(line) for line in audit.read_text().splitlines() if '"FetchWeights"' in line]
    assert len(streams) >= 2 and streams[-1]["outcome"] == "OK", streams  # cut, then resumed
    assert 0 < streams[-1]["bytes_sent"] < owner.size  # the resumed stream sent only the missing bytes


# ------------------------------------------------------------------ SuperLink restart (see the module docstring)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """Two sites' data, a signed tiny model, a PKI: what ``xkt-server federate`` would be given."""
    return make_federation(tmp_path_factory.mktemp("faults-fed"))


def online_nodes(link: SuperLink) -> set[str]:
    """Ids of the SuperNodes the SuperLink reports online (``flwr supernode list --format json``)."""
    listed = json.loads(flwr(link.home, "supernode", "list", CONNECTION, "--format", "json", timeout_s=60).stdout)
    return {str(node["node-id"]) for node in listed["nodes"] if node["status"] == "online"}


def _wait_online(link: SuperLink, count: int, timeout_s: float) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while len(nodes := online_nodes(link)) < count:
        assert time.monotonic() < deadline, f"only {nodes} online after {timeout_s} s"
        time.sleep(1)
    return nodes


def test_supernodes_reconnect_with_their_node_ids_after_a_superlink_restart(
    federation: Federation, tmp_path: Path
) -> None:
    """SIGKILL the SuperLink, start it again on its port with its database: the same sites take the next round."""
    sites = [make_site(federation, f"restart{i}", i) for i in (0, 1)]
    cfg = SuperLinkConfig(work=tmp_path / "superlink", tls_cert=federation.cert, tls_key=federation.key,
                          ca_cert=federation.ca)  # fmt: skip
    joins: list[subprocess.Popen[bytes]] = []
    try:
        with SuperLink(cfg) as link:
            for index, site in enumerate(sites):
                register_site(link.home, site["pub"], name=f"restart{index}")
            joins = [start_join(federation, site, link.address) for site in sites]
            before = _wait_online(link, 2, 120)
            assert link.process is not None
            os.kill(link.process.pid, signal.SIGKILL)  # a crash: no shutdown, no goodbye to the SuperNodes
            link.process.wait(timeout=10)
            port = link.port
        with SuperLink(replace(cfg, port=port)) as restarted:  # the same command: port, database, TLS, node auth
            out = tmp_path / "run"
            run_config = FederationConfig(model_dir=str(federation.model), owner_key=str(federation.owner_pub),
                                          out_dir=str(out), rounds=1, min_sites=2, local_epochs=1,
                                          join_timeout_s=120, round_timeout_s=300)  # fmt: skip
            lines: list[str] = []
            stream_run(restarted.home, write_run_config(tmp_path / "run.toml", run_config), 400, lines.append)
    finally:
        stop_all(joins)
    (record,) = json.loads((out / "rounds.json").read_text())["rounds"]
    assert record["replied"] == 2 and not record["failed"], (record, lines[-20:])
    assert set(record["metrics"]) == before, (record["metrics"].keys(), before)  # the same node ids came back
