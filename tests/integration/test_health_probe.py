"""``xkt-server health``, the probe the container images and Kubernetes manifests run, against real servers.

A real ``xkt-server serve`` on loopback (TLS with tokens, then mutual TLS) must pass the probe
with the owner CA (and, under mutual TLS, the probe's own certificate) and fail it with a
documented exit code otherwise; a gRPC server reporting NOT_SERVING and a stopped server must
fail it.  ``--fleet`` is checked against a small HTTPS server standing in for the fleet proxy
(the real proxy needs a SuperLink and nginx; its ``/health`` route is tested in test_fleet_proxy).
"""

from __future__ import annotations

import http.server
import json
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from xkt.server.cli import app
from xkt.shared.errors import ExitCode
from xkt.shared.models import ArchSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owner_fixtures import BIN, OwnerFiles, make_owner, serve_subprocess  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> OwnerFiles:
    return make_owner(tmp_path_factory.mktemp("health"), arch=ArchSpec("resnet_tiny", num_classes=3), class_names="abc")


def probe(*args: str) -> tuple[int, dict[str, object]]:
    """``xkt-server health ARGS --json`` in-process: the exit code and the JSON it printed."""
    result = CliRunner().invoke(app, ["health", *args, "--json"])
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return result.exit_code, json.loads(lines[-1]) if lines else {}


def kit_of(owner: OwnerFiles, folder: Path) -> Path:
    """A probe kit as `xkt-server provision add-site` lays it out: ca.crt, site.crt, site.key (0600)."""
    folder.mkdir(exist_ok=True)
    shutil.copy(owner.pki.ca.cert_path, folder / "ca.crt")
    shutil.copy(owner.pki.site.cert_path, folder / "site.crt")
    shutil.copy(owner.pki.site.key_path, folder / "site.key")
    (folder / "site.key").chmod(0o600)
    return folder


def test_the_console_script_passes_a_tls_server_and_fails_once_it_stopped(owner: OwnerFiles) -> None:
    ca = str(owner.pki.ca.cert_path)
    with serve_subprocess(owner, *owner.tls_flags) as served:
        address = f"127.0.0.1:{served.port}"
        done = subprocess.run(
            [str(BIN / "xkt-server"), "health", "--address", address, "--ca-cert", ca, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "ok": True,
            "address": address,
            "protocol": "grpc",
            "status": "SERVING",
            "transport": "TLS",
        }
        code, report = probe("--address", address, "--ca-cert", str(owner.pki.other_ca.cert_path))
        assert code == ExitCode.TRANSPORT and report["error"]["reason"] == "tls-untrusted-server"  # type: ignore[index]
    code, report = probe("--address", address, "--ca-cert", ca, "--timeout", "2")
    assert code == ExitCode.TRANSPORT and report["ok"] is False


def test_the_module_form_probes_do_not_import_torch(owner: OwnerFiles) -> None:
    """Probes run ``python -m xkt.server.commands.health``: the same command, cheap enough to run every few seconds."""
    script = (
        "import runpy, sys\n"
        "try:\n"
        "    runpy.run_module('xkt.server.commands.health', run_name='__main__')\n"
        "finally:\n"
        "    sys.stderr.write('torch imported\\n' if 'torch' in sys.modules else 'torch not imported\\n')\n"
    )
    ca = str(owner.pki.ca.cert_path)
    with serve_subprocess(owner, *owner.tls_flags) as served:
        args = ["--address", f"127.0.0.1:{served.port}", "--ca-cert", ca, "--json"]
        done = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode == 0 and json.loads(done.stdout)["status"] == "SERVING", done.stderr
    assert done.stderr.strip().endswith("torch not imported"), done.stderr


def test_under_mutual_tls_the_probe_needs_a_certificate_of_its_own(owner: OwnerFiles, tmp_path: Path) -> None:
    flags = (*owner.tls_flags, "--client-ca", str(owner.pki.ca.cert_path))
    with serve_subprocess(owner, *flags) as served:
        address = f"127.0.0.1:{served.port}"
        code, report = probe("--address", address, "--ca-cert", str(owner.pki.ca.cert_path))
        assert code == ExitCode.TRANSPORT, report  # the handshake itself is refused
        code, report = probe("--address", address, "--kit", str(kit_of(owner, tmp_path / "probe")))
        assert code == 0 and report["transport"] == "mutual TLS", report
        code, report = probe("--address", address, "--kit", str(tmp_path / "probe"), "--service", "")
        assert code == 0, report


@pytest.fixture()
def not_serving() -> Iterator[tuple[int, health.HealthServicer]]:
    """A plaintext loopback gRPC server whose only service is health, NOT_SERVING for xkt.v1.SourceModel."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("xkt.v1.SourceModel", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(0).wait(5)


def test_not_serving_and_unknown_services_fail(not_serving: tuple[int, health.HealthServicer]) -> None:
    port, servicer = not_serving
    address = f"127.0.0.1:{port}"
    code, report = probe("--address", address, "--insecure")
    assert code == ExitCode.TRANSPORT and report["error"]["reason"] == "not-serving"  # type: ignore[index]
    servicer.set("xkt.v1.SourceModel", health_pb2.HealthCheckResponse.SERVING)
    assert probe("--address", address, "--insecure")[0] == 0
    code, report = probe("--address", address, "--insecure", "--service", "other.Service")
    assert code == ExitCode.CONFIG_OR_DATA and report["error"]["reason"] == "unknown-service"  # type: ignore[index]


def test_plaintext_is_refused_off_loopback() -> None:
    code, report = probe("--address", "192.0.2.1:8443", "--insecure")
    assert code == ExitCode.CONFIG_OR_DATA and report["error"]["reason"] == "insecure-non-loopback"  # type: ignore[index]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(self.status if self.path == "/health" else 403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        pass


@pytest.fixture()
def fleet_proxy(owner: OwnerFiles) -> Iterator[http.server.HTTPServer]:
    """An HTTPS server with the owner's server certificate answering GET /health, like the fleet proxy."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(owner.pki.server.cert_path, owner.pki.server.key_path)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        _Health.status = 200


def test_fleet_mode_checks_the_proxy_health_route(owner: OwnerFiles, fleet_proxy: http.server.HTTPServer) -> None:
    address = f"127.0.0.1:{fleet_proxy.server_address[1]}"
    code, report = probe("--fleet", "--address", address, "--ca-cert", str(owner.pki.ca.cert_path))
    assert code == 0 and report["protocol"] == "https" and report["status"] == "SERVING", report
    code, report = probe("--fleet", "--address", address, "--ca-cert", str(owner.pki.other_ca.cert_path))
    assert code == ExitCode.TRANSPORT and report["error"]["reason"] == "tls-untrusted-server"  # type: ignore[index]
    _Health.status = 502  # what nginx answers while the SuperLink behind it is down
    code, report = probe("--fleet", "--address", address, "--ca-cert", str(owner.pki.ca.cert_path))
    assert code == ExitCode.TRANSPORT and report["error"]["reason"] == "not-serving"  # type: ignore[index]
