"""The fleet proxy on loopback: a real nginx in front of a real TLS ``flower-superlink``.

One SuperLink (node auth on, SQLite state) and one proxy serve the module.  The proxy
presents a certificate from a second, "public" CA, so a test can tell which side of the
proxy answered a handshake.  Every request goes through ``http.client`` with the path
sent exactly as written, so ``..`` and percent-encoding tricks reach nginx unnormalised.
Tests that need nginx skip with a clear reason where it is not installed.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListNodesResponse,
    ListRunsRequest,
    ListRunsResponse,
    RegisterNodeRequest,
    RegisterNodeResponse,
)
from flwr.proto.fleet_pb2 import ActivateNodeRequest, ActivateNodeResponse
from flwr.proto.message_pb2 import PushObjectRequest

from xkt.server.fleet_proxy import REFUSAL, FleetProxy, FleetProxyConfig, render_nginx_conf
from xkt.server.provision import PkiPaths, init_pki
from xkt.shared.errors import ConfigError, TransportError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flower_fixtures import (  # noqa: E402
    BIN,
    Reply,
    RunningSuperLink,
    flower_env,
    free_port,
    https_request,
    log_tail,
    start_in_own_group,
    stop_group,
    superlink,
    tls_context,
)

needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None, reason="nginx is not installed (make install does it: apt-get install nginx)"
)
PROTOBUF = {"content-type": "application/protobuf"}


@dataclass(frozen=True)
class Stack:
    link: RunningSuperLink
    proxy: FleetProxy
    public: PkiPaths  # the CA and certificate the proxy presents to sites
    root: Path

    def via(self, method: str, path: str, **kwargs: object) -> Reply:
        """A request to the proxy's public port, trusting the public CA."""
        context = tls_context(self.public.ca_cert)
        return https_request(self.proxy.port, method, path, context=context, **kwargs)  # type: ignore[arg-type]


def proxy_config(root: Path, link: RunningSuperLink, public: PkiPaths, **changes: object) -> FleetProxyConfig:
    cfg = FleetProxyConfig(
        listen_host="127.0.0.1",
        listen_port=0,  # a free one, chosen by the proxy at start
        tls_cert=public.server_cert,
        tls_key=public.server_key,
        upstream_port=link.port,
        upstream_ca=link.pki.ca_cert,
        work=root,
    )
    return replace(cfg, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (make install does it: apt-get install nginx)")
    root = tmp_path_factory.mktemp("fleet-proxy")
    public = init_pki(root / "public-pki", ca_name="xkt public CA")
    with (
        superlink(root / "link", supernode_auth=True, database=root / "link" / "state.db") as link,
        FleetProxy(proxy_config(root / "proxy", link, public)) as proxy,
    ):
        yield Stack(link, proxy, public, root)


def refused_by_nginx(reply: Reply) -> bool:
    return reply.status == 403 and reply.body.decode(errors="replace").strip() == REFUSAL


# ------------------------------------------------------------------ what passes


@needs_nginx
def test_health_through_the_proxy_is_the_superlinks_answer(stack: Stack) -> None:
    direct, via = stack.link.request("GET", "/health"), stack.via("GET", "/health")
    assert direct.status == 200
    assert (via.status, via.body) == (direct.status, direct.body)
    assert stack.via("HEAD", "/health").status == 200
    assert "nginx/" not in via.headers.get("server", "")  # server_tokens off: no version


@needs_nginx
def test_a_fleet_post_reaches_the_superlink(stack: Stack) -> None:
    """A wrong content type is refused by Flower itself: same status and JSON body both ways."""
    headers = {"content-type": "application/json"}
    direct = stack.link.request("POST", "/v1/fleet/get-run", body=b"{}", headers=headers)
    via = stack.via("POST", "/v1/fleet/get-run", body=b"{}", headers=headers)
    assert 400 <= direct.status < 500 and direct.status != 403
    assert (via.status, via.body) == (direct.status, direct.body)
    assert via.headers["content-type"].startswith("application/json")


def _node_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pem


def _signed(key: ec.EllipticCurvePrivateKey, public_pem: bytes, *, tamper: bool = False) -> dict[str, str]:
    """Flower's node-auth headers: the PEM public key, an ISO timestamp and its ECDSA-SHA256 signature."""
    stamp = dt.datetime.now(dt.UTC).isoformat()
    signature = key.sign(stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    if tamper:
        stamp = (dt.datetime.fromisoformat(stamp) - dt.timedelta(seconds=1)).isoformat()
    return {
        **PROTOBUF,
        "flwr-public-key": base64.b64encode(public_pem).decode("ascii"),
        "flwr-timestamp": stamp,
        "flwr-signature": base64.b64encode(signature).decode("ascii"),
    }


def _register_directly(link: RunningSuperLink, public_pem: bytes, name: str) -> int:
    """What `flwr supernode register` does: the owner's Control API, on the SuperLink's own port."""
    request = RegisterNodeRequest(public_key=public_pem, name=name)
    reply = link.request("POST", "/v1/control/register-node", body=request.SerializeToString(), headers=PROTOBUF)
    assert reply.status == 200, reply.body
    response = RegisterNodeResponse()
    response.ParseFromString(reply.body)
    return int(response.node_id)


@needs_nginx
def test_signed_node_auth_headers_pass_through_unchanged(stack: Stack) -> None:
    key, public_pem = _node_key()
    node_id = _register_directly(stack.link, public_pem, "site-headers")
    body = ActivateNodeRequest(public_key=public_pem, heartbeat_interval=30.0).SerializeToString()
    good = stack.via("POST", "/v1/fleet/activate-node", body=body, headers=_signed(key, public_pem))
    assert good.status == 200, good.body
    activated = ActivateNodeResponse()
    activated.ParseFromString(good.body)
    assert activated.node_id == node_id
    for headers in (_signed(key, public_pem, tamper=True), PROTOBUF):  # a bad signature, then none
        refused = stack.via("POST", "/v1/fleet/activate-node", body=body, headers=headers)
        assert refused.status == 401, refused.body  # Flower's verdict, not nginx's
        assert not refused_by_nginx(refused)


@needs_nginx
def test_a_flower_sized_chunk_fits_and_a_huge_body_is_refused_up_front(stack: Stack) -> None:
    chunk = PushObjectRequest(object_id="0" * 64, object_content=os.urandom(6 * 1024 * 1024)).SerializeToString()
    direct = stack.link.request("POST", "/v1/fleet/push-object", body=chunk, headers=PROTOBUF, timeout_s=30)
    via = stack.via("POST", "/v1/fleet/push-object", body=chunk, headers=PROTOBUF, timeout_s=30)
    assert via.status == direct.status != 413  # unsigned, so Flower says 401; nginx took the 6 MiB body
    assert _declared_body_status(stack, 65 * 1024 * 1024) == 413


def _declared_body_status(stack: Stack, length: int) -> int:
    """Announce a body of ``length`` bytes and send none: nginx judges Content-Length before reading."""
    port = stack.proxy.port
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls_context(stack.public.ca_cert))
    try:
        conn.putrequest("POST", "/v1/fleet/push-object")
        conn.putheader("content-type", "application/protobuf")
        conn.putheader("content-length", str(length))
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


# ------------------------------------------------------------------ what is refused


REFUSED = [
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/runtime/acquire-task"),
    ("POST", "/v1/runtime/pull-messages"),
    ("POST", "/v1/runtime/responses"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/"),
    ("POST", "/health"),
    ("GET", "/v1/fleet/get-run"),  # Fleet routes are POST only
    ("POST", "/v1/fleet/../control/list-runs"),
    ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ("POST", "/v1/fleet/..%2fcontrol/list-runs"),
    ("POST", "/v1/fleet//../control/list-runs"),
    ("POST", "/v1/fleet/get-run?x=/../../control/list-runs"),
    ("POST", "/V1/CONTROL/list-runs"),
]


@needs_nginx
@pytest.mark.parametrize(("method", "path"), REFUSED)
def test_everything_but_fleet_and_health_is_refused_by_nginx(stack: Stack, method: str, path: str) -> None:
    reply = stack.via(method, path, body=ListRunsRequest().SerializeToString(), headers=PROTOBUF)
    assert refused_by_nginx(reply), (reply.status, reply.body[:200])


@needs_nginx
def test_the_control_api_is_open_on_the_superlink_port_itself(stack: Stack) -> None:
    """The control experiment: the same call straight to the SuperLink succeeds, so it is the proxy that blocks it."""
    direct = stack.link.request(
        "POST", "/v1/control/list-runs", body=ListRunsRequest().SerializeToString(), headers=PROTOBUF
    )
    assert direct.status == 200, direct.body
    ListRunsResponse().ParseFromString(direct.body)
    assert stack.link.request("GET", "/openapi.json").status == 200


# ------------------------------------------------------------------ the public side's TLS


def _handshake(port: int, context: ssl.SSLContext) -> tuple[bytes, str]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.getpeercert(binary_form=True) or b"", tls.version() or ""


@needs_nginx
def test_the_public_side_presents_the_configured_certificate(stack: Stack) -> None:
    port = stack.proxy.port
    der, version = _handshake(port, tls_context(stack.public.ca_cert))
    expected = stack.public.server_cert.read_text()
    assert der == ssl.PEM_cert_to_DER_cert(expected)
    assert version in ("TLSv1.2", "TLSv1.3")
    for stranger in (tls_context(stack.link.pki.ca_cert), tls_context(None)):  # the SuperLink's CA; the system store
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(port, stranger)


# ------------------------------------------------------------------ failures and lifecycle


@needs_nginx
def test_a_bad_nginx_config_is_one_clear_error(stack: Stack, tmp_path: Path) -> None:
    """A key that does not match the certificate passes xkt's own checks; nginx -t names the mismatch."""
    cfg = proxy_config(tmp_path / "proxy", stack.link, stack.public, tls_key=stack.link.pki.server_key)
    proxy = FleetProxy(cfg)
    with pytest.raises(ConfigError) as caught:
        proxy.start()
    assert caught.value.reason == "bad-nginx-config"
    assert "\n" not in caught.value.message
    assert "[emerg]" in caught.value.message and "mismatch" in caught.value.message.lower()
    assert proxy.pid is None


def test_a_missing_nginx_binary_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = init_pki(tmp_path / "pki")
    cfg = FleetProxyConfig(
        listen_port=free_port(),
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        upstream_port=free_port(),
        upstream_ca=pki.ca_cert,
        work=tmp_path / "proxy",
    )
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ConfigError) as caught, FleetProxy(cfg):
        pass
    assert caught.value.reason == "missing-nginx"
    assert caught.value.hint.startswith("install nginx (make install does it: apt-get install nginx)")


@needs_nginx
def test_a_taken_port_fails_the_start_with_nginxs_reason(stack: Stack, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        cfg = proxy_config(tmp_path / "proxy", stack.link, stack.public, listen_port=squatter.getsockname()[1])
        with pytest.raises(TransportError) as caught:
            FleetProxy(cfg).start()
    assert caught.value.reason == "proxy-start-failed"
    assert "in use" in caught.value.message


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid``, from /proc (field 4 of stat is the parent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


@needs_nginx
def test_stop_ends_master_and_workers(stack: Stack, tmp_path: Path) -> None:
    proxy = FleetProxy(proxy_config(tmp_path / "proxy", stack.link, stack.public))
    proxy.start()
    assert proxy.port != 0 and proxy.address == f"127.0.0.1:{proxy.port}"
    master = proxy.pid
    assert master is not None
    workers = _children(master)
    assert workers, "nginx started no worker"
    if os.geteuid() == 0:  # started by root: workers drop to nobody
        assert all(os.stat(f"/proc/{w}").st_uid != 0 for w in workers)
    assert stack.via("GET", "/health").status == 200  # the module's proxy is unaffected
    proxy.stop()
    for pid in (master, *workers):
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"nginx process {pid} survived stop()"
    assert proxy.pid is None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# ------------------------------------------------------------------ a real SuperNode through the proxy


@needs_nginx
@pytest.mark.slow
def test_a_real_supernode_activates_through_the_proxy(stack: Stack, tmp_path: Path) -> None:
    """flower-supernode with node auth, dialling only the proxy, shows up online on the SuperLink."""
    key = ec.generate_private_key(ec.SECP384R1())
    key_path = tmp_path / "supernode.key"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    node_id = _register_directly(stack.link, public_pem, "site-e2e")
    args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{stack.proxy.port}"]
    args += ["--root-certificates", str(stack.public.ca_cert), "--auth-supernode-private-key", str(key_path)]
    args += ["--port", str(free_port()), "--max-retries", "3"]
    log = tmp_path / "supernode.log"
    node = start_in_own_group(args, flower_env(tmp_path / "flwr-home-supernode"), log)
    try:
        status = _wait_for_node_status(stack.link, node_id, "online", node, timeout_s=60)
        assert status == "online", f"node status {status!r}:\n{log_tail(log)}"
    finally:
        stop_group(node)
    access = (stack.proxy.cfg.logs_dir / "access.log").read_text()
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 200' in access


def _wait_for_node_status(
    link: RunningSuperLink, node_id: int, wanted: str, node: subprocess.Popen[bytes], timeout_s: float
) -> str:
    status, deadline = "", time.monotonic() + timeout_s
    while time.monotonic() < deadline and node.poll() is None:
        reply = link.request(
            "POST", "/v1/control/list-nodes", body=ListNodesRequest().SerializeToString(), headers=PROTOBUF
        )
        response = ListNodesResponse()
        response.ParseFromString(reply.body)
        status = next((n.status for n in response.nodes_info if n.node_id == node_id), "")
        if status == wanted:
            break
        time.sleep(0.5)
    return status


# ------------------------------------------------------------------ the rendered config (no processes)


def test_the_conf_keeps_everything_in_the_work_dir(tmp_path: Path) -> None:
    pki = init_pki(tmp_path / "pki")
    cfg = FleetProxyConfig(
        listen_port=8443,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        upstream_port=8000,
        upstream_ca=pki.ca_cert,
        work=tmp_path / "proxy",
    )
    conf = render_nginx_conf(cfg)
    for needle in ("/etc/", "/var/", "/run/"):
        assert needle not in conf
    assert "proxy_pass https://superlink;" in conf and "location / { return 403; }" in conf
    assert ("user nobody" in conf) == (os.geteuid() == 0)
    with pytest.raises(ConfigError) as caught:
        render_nginx_conf(replace(cfg, tls_cert=tmp_path / 'we"ird;.crt'))
    assert caught.value.reason == "bad-proxy-path"
    with pytest.raises(ConfigError):
        replace(cfg, upstream_host="10.0.0.5")  # the SuperLink must stay on loopback
    with pytest.raises(ConfigError):
        replace(cfg, timeout_s=10)  # shorter than Flower's 30 s request timeout
    with pytest.raises(ConfigError):
        replace(cfg, upstream_tls_name="127.0.0.1")  # nginx 1.22 matches DNS SANs only
