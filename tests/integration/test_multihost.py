"""The owner and the sites on separate hosts with their own addresses: Linux network namespaces.

The test builds a small LAN: a bridge inside a namespace of its own, and one namespace per host,
each joined to the bridge by a veth pair (owner 10.77.0.1, site-a 10.77.0.2, site-b 10.77.0.3).
The machine's own network is not touched, and every namespace (with its links) is removed at the
end.  Then, as operators would:

1. the owner provisions mutual TLS for its public address (``xkt-server provision init
   --server-ip 10.77.0.1``, one kit per site) and serves its signed model on 10.77.0.1:8443;
2. site-a fetches the model and adapts it over mutual TLS; site-b, with no site certificate, is
   refused;
3. the owner starts a federation whose fleet-only proxy listens on 10.77.0.1:9443; both sites join
   from their own hosts and a round runs;
4. while the sites take part, nothing listens on a site's addresses (every listening socket in a
   site namespace is on loopback), and the SuperLink itself is reachable only on the owner's
   loopback: from a site, its port on the owner's address is closed.

Needs root (namespaces, veth) and nginx; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xkt.server.federation_runner import app_sha256
from xkt.shared.artifact import load_artifact
from xkt.shared.models import resolve_arch
from xkt.shared.render import TASK_CLASSES
from xkt.shared.signing import load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from federation_fixtures import (  # noqa: E402
    BIN,
    Federation,
    finish,
    make_site,
    read_json_line,
    run,
    start_federate,
    start_join,
    stop_all,
)
from owner_fixtures import save_signed_toy  # noqa: E402

SUBNET = "10.77.0"
HOSTS = {"owner": f"{SUBNET}.1", "site-a": f"{SUBNET}.2", "site-b": f"{SUBNET}.3"}
GRPC_PORT, FLEET_PORT = 8443, 9443
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (make install installs it)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's `ip` for network namespaces"),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and veth pairs need root"),
]


# ------------------------------------------------------------------ the LAN


@dataclass(frozen=True)
class Lan:
    """Namespaces by host name; ``exec(host)`` is the command prefix that runs a program on that host."""

    namespaces: dict[str, str]

    def exec(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[host]]

    def listeners(self, host: str) -> list[str]:
        """Local addresses of every listening TCP socket on ``host``."""
        lines = _ip(*self.exec(host), "ss", "-ltnH").splitlines()
        return [line.split()[3] for line in lines if line.strip()]


def _ip(*args: str) -> str:
    completed = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {completed.stderr.strip()}")
    return completed.stdout


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    """Hosts on one bridge; created for this module and removed after it (links go with their namespace)."""
    tag = secrets.token_hex(3)
    switch = f"xkt-{tag}-lan"
    namespaces = {host: f"xkt-{tag}-{host}" for host in HOSTS}
    created: list[str] = []
    try:
        for name in (switch, *namespaces.values()):
            _ip("ip", "netns", "add", name)
            created.append(name)
            _ip("ip", "-n", name, "link", "set", "lo", "up")
        _ip("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("ip", "-n", switch, "link", "set", "br0", "up")
        for index, (host, address) in enumerate(HOSTS.items()):
            ns, port = namespaces[host], f"p{index}"
            _ip("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", switch)
            _ip("ip", "-n", switch, "link", "set", port, "master", "br0", "up")
            _ip("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("ip", "-n", ns, "link", "set", "eth0", "up")
    except RuntimeError as error:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        pytest.skip(f"this kernel or container does not allow network namespaces with veth pairs: {error}")
    try:
        yield Lan(namespaces)
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


# ------------------------------------------------------------------ the owner's files


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """Data for two sites, a signed tiny model, and mTLS provisioned for the owner's public address."""
    root = tmp_path_factory.mktemp("hosts")
    data, pki = root / "data", root / "pki"
    run("xkt-bench", "data", "--out", str(data), "--per-class", "2", "--site-per-class", "8", "--size", "32",
        "--sites", "2", "--skew", "1", "-q")  # fmt: skip
    toy = save_signed_toy(
        root / "owner", arch=resolve_arch("resnet_tiny", {}, len(TASK_CLASSES)), class_names=TASK_CLASSES
    )
    run("xkt-server", "provision", "init", "--out", str(pki), "--server-ip", HOSTS["owner"], "-q")
    run("xkt-server", "provision", "add-site", "site-a", "--pki", str(pki), "-q")
    return Federation(
        root=root,
        data=data,
        model=toy.model_dir,
        owner_pub=toy.owner_pub,
        ca=pki / "ca.crt",
        cert=pki / "server.crt",
        key=pki / "server.key",
        app_sha256=app_sha256(),
    )


def _serve(lan: Lan, fed: Federation) -> subprocess.Popen[bytes]:
    pki = fed.ca.parent
    args = [*lan.exec("owner"), str(BIN / "xkt-server"), "serve", "--model", str(fed.model)]
    args += ["--owner-key", str(fed.owner_pub), "--listen", f"{HOSTS['owner']}:{GRPC_PORT}", "--json"]
    args += ["--tls-cert", str(fed.cert), "--tls-key", str(fed.key), "--client-ca", str(fed.ca), "--pki", str(pki)]
    args += ["--audit-log", str(fed.root / "audit.jsonl"), "--grace", "0.5"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def _client(lan: Lan, host: str, *args: str, expect: int = 0) -> dict[str, object]:
    completed = subprocess.run(
        [*lan.exec(host), str(BIN / "xkt-client"), *args, "--json"], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == expect, completed.stderr[-2000:] + completed.stdout[-2000:]
    return dict(json.loads(completed.stdout))


# ------------------------------------------------------------------ the tests


def test_a_site_on_its_own_host_adapts_over_mutual_tls(lan: Lan, federation: Federation) -> None:
    server = _serve(lan, federation)
    try:
        assert read_json_line(server, 60).get("ok") is True
        site = federation.root / "site-a-data"
        shutil.copytree(federation.data / "depth-site0", site)
        kit = federation.ca.parent / "sites" / "site-a"
        server_address = f"{HOSTS['owner']}:{GRPC_PORT}"
        common = ["--server", server_address, "--owner-key", str(federation.owner_pub)]
        out = federation.root / "site-a-adapted"
        result = _client(lan, "site-a", "adapt", *common, "--kit", str(kit), "--site", str(site),
                         "--method", "shot", "--epochs", "1", "--out", str(out))  # fmt: skip
        assert result["ok"] is True
        adapted = load_artifact(out, [load_public_key(site / ".xkt" / "site.pub")])
        assert (
            adapted.manifest.provenance["source_sha256"]
            == load_artifact(federation.model, [load_public_key(federation.owner_pub)]).manifest.weights.sha256
        )

        refused = _client(lan, "site-b", "fetch", *common, "--ca-cert", str(federation.ca),
                          "--out", str(federation.root / "site-b-fetch"), expect=5)  # fmt: skip
        assert refused["error"]["reason"] == "tls-handshake-failed", refused  # type: ignore[index]
        assert not (federation.root / "site-b-fetch").exists() or not any((federation.root / "site-b-fetch").iterdir())
    finally:
        stop_all([server])
    audit = [json.loads(line) for line in (federation.root / "audit.jsonl").read_text().splitlines()]
    assert any(entry.get("site") == "site-a" for entry in audit), audit[-3:]


def test_a_federated_round_runs_across_hosts_and_nothing_listens_at_the_sites(lan: Lan, federation: Federation) -> None:
    sites = [make_site(federation, name, index) for index, name in enumerate(("site-a", "site-b"))]
    out = federation.root / "federation"
    args = ["--rounds", "1", "--min-sites", "2", "--local-epochs", "1", "--listen", f"{HOSTS['owner']}:{FLEET_PORT}"]
    owner = start_federate(federation, sites, out, *args, prefix=lan.exec("owner"))
    procs = [owner]
    try:
        ready = read_json_line(owner, 120)
        assert ready["listen"] == f"{HOSTS['owner']}:{FLEET_PORT}", ready
        joins = [start_join(federation, site, ready["listen"], prefix=lan.exec(host))
                 for site, host in zip(sites, ("site-a", "site-b"), strict=True)]  # fmt: skip
        procs += joins
        for join in joins:
            assert read_json_line(join, 60).get("supernode_pid")  # each SuperNode is up on its host
        site_listeners = {host: lan.listeners(host) for host in ("site-a", "site-b")}
        owner_listeners = lan.listeners("owner")
        superlink_ports = _superlink_ports(owner_listeners)
        closed = {port: _closed_from(lan, "site-a", HOSTS["owner"], port) for port in superlink_ports}
        result = finish(owner, 400)
    finally:
        stop_all(procs)
    for host, listeners in site_listeners.items():
        assert all(_is_loopback(address) for address in listeners), (host, listeners)
    public = sorted(address for address in owner_listeners if not _is_loopback(address))
    assert public == [f"{HOSTS['owner']}:{FLEET_PORT}"], owner_listeners  # only the fleet proxy faces the sites
    assert superlink_ports and all(closed.values()), closed  # the SuperLink (Control API) is not reachable
    (record,) = result["rounds"]
    assert record["replied"] == 2 and not record["failed"], record
    for site in sites:
        assert json.loads((site["out"] / "report.json").read_text())["rounds"][0]["round"] == 1


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host == "::1"


def _superlink_ports(listeners: list[str]) -> list[int]:
    """Ports the owner listens on at loopback only (the SuperLink and its local services)."""
    return sorted({int(address.rsplit(":", 1)[1]) for address in listeners if _is_loopback(address)})


def _closed_from(lan: Lan, host: str, address: str, port: int) -> bool:
    """True when a TCP connection from ``host`` to ``address:port`` fails (a probe run inside that namespace)."""
    probe = (
        "import socket, sys\n"
        "s = socket.socket(); s.settimeout(3)\n"
        f"sys.exit(1 if s.connect_ex(({address!r}, {port})) == 0 else 0)\n"
    )
    completed = subprocess.run([*lan.exec(host), sys.executable, "-c", probe], capture_output=True, timeout=30)
    return completed.returncode == 0
