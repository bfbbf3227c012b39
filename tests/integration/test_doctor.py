"""``xkt-client doctor``'s data-compatibility row against a real ``xkt-server serve`` on loopback.

``check_compatibility`` (client/commands/doctor.py) judges the site only against a
*verified* manifest: it reads ``site.toml`` (modality, channel count), lists ``target/``
and decodes one sample image, then compares channels with the model's input spec.  A
failure there is a data problem (exit 3) and leaves every other row reported.  The check
is local: the tests read what actually goes over the wire and find nothing of the site.
test_fetch.py already covers the network rows and a wrong owner key; this file is about
the data row.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from PIL import Image
from typer.testing import CliRunner

from xkt.client.cli import app
from xkt.protos import source_model_pb2 as pb
from xkt.server.auth import add_token
from xkt.shared.artifact import InputSpec, save_artifact
from xkt.shared.models import ArchSpec, build_model
from xkt.shared.signing import generate_keypair, load_private_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tls_fixtures import Pki, make_pki  # noqa: E402

doctor_module = importlib.import_module("xkt.client.commands.doctor")

ARCH = ArchSpec("resnet_tiny", num_classes=4)  # the smallest model there is: ~0.4 MB
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 30.0
NETWORK_ROWS = ("reachable", "tls", "identity", "owner-key", "health")
pytestmark = pytest.mark.timeout(90)


@dataclass(frozen=True)
class Owner:
    root: Path
    model_dir: Path
    owner_pub: Path
    other_pub: Path
    pki: Pki
    tokens: Path
    token_file: Path


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Owner:
    root = tmp_path_factory.mktemp("doctor")
    key, pub = generate_keypair(root / "keys")
    _other, other_pub = generate_keypair(root / "other")
    torch.manual_seed(0)
    save_artifact(
        build_model(ARCH).eval(),
        out_dir=root / "model",
        private_key=load_private_key(key),
        model_id="toy",
        model_version="1",
        arch=ARCH,
        class_names=list("abcd"),
        input_spec=InputSpec("rgb", 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        provenance={"trainer": "test"},
    )
    pki = make_pki(root / "pki")
    token = add_token(root / "tokens.txt", "site-a")
    token_file = root / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)  # the client refuses a token file others can read
    return Owner(root, root / "model", pub, other_pub, pki, root / "tokens.txt", token_file)


def _serve(owner: Owner, folder: Path, *transport: str) -> Iterator[int]:
    """``xkt-server serve`` on 127.0.0.1 port 0 with ``transport`` flags; yields its port, then SIGTERMs it."""
    folder.mkdir(parents=True, exist_ok=True)
    args = [str(BIN / "xkt-server"), "serve", "--model", str(owner.model_dir), "--owner-key", str(owner.owner_pub)]
    args += ["--listen", "127.0.0.1:0", "--tokens", str(owner.tokens), "--json", "--grace", "0.5", *transport]
    with (folder / "server.err").open("w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        announced = json.loads(line) if line else {}
        assert announced.get("ok") is True, f"server did not start: {line!r} {(folder / 'server.err').read_text()}"
        yield int(announced["port"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tls_port(owner: Owner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tls = ("--tls-cert", str(owner.pki.server.cert_path), "--tls-key", str(owner.pki.server.key_path))
    yield from _serve(owner, tmp_path_factory.mktemp("tls-server"), *tls)


@pytest.fixture
def plaintext_port(owner: Owner, tmp_path: Path) -> Iterator[int]:
    yield from _serve(owner, tmp_path / "plain-server", "--insecure")


def _doctor_args(owner: Owner, port: int, *extra: str) -> list[str]:
    args = ["doctor", "--server", f"127.0.0.1:{port}", "--ca-cert", str(owner.pki.ca.cert_path)]
    return args + ["--token-file", str(owner.token_file), *extra]


def _doctor_json(args: list[str]) -> tuple[int, dict[str, Any]]:
    """Run doctor in-process with ``--json``: (exit code, result object)."""
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.stdout.strip(), (result.exit_code, result.stderr, result.exception)
    return result.exit_code, json.loads(result.stdout)


def _rows(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {row["name"]: row for row in report["checks"]}


# ------------------------------------------------------------------ site folders


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(size: int = 40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _depth_toml(site: Path, name: str = "depth", channels: int = 1) -> None:
    site.mkdir(parents=True, exist_ok=True)
    body = f'[modality]\nname = "{name}"\nchannels = {channels}\nunits = "mm"\nvalue_range = [0, 10000]\n'
    (site / "site.toml").write_text(body)


def rgb_site(site: Path) -> None:
    """No site.toml (plain 8-bit RGB) and RGB PNGs of another size than the model's 32x32."""
    _png(site / "target" / "a.png", _rgb(40))
    _png(site / "target" / "sub" / "b.png", _rgb(40))


def depth_site(site: Path) -> None:
    """A 1-channel 16-bit depth site: the model repeats it to its 3 channels."""
    _depth_toml(site)
    target = site / "target"
    target.mkdir(parents=True)
    np.save(target / "d0.npy", np.random.default_rng(1).integers(0, 10000, (48, 48), dtype=np.uint16))


def bad_channel_count(site: Path) -> None:
    _depth_toml(site, channels=2)
    _png(site / "target" / "a.png", _rgb())


def toml_without_value_range(site: Path) -> None:
    site.mkdir(parents=True)
    (site / "site.toml").write_text('[modality]\nname = "depth"\nchannels = 1\n')
    _png(site / "target" / "a.png", _rgb())


def no_target_folder(site: Path) -> None:
    site.mkdir(parents=True)
    (site / "images").mkdir()
    _png(site / "images" / "a.png", _rgb())


def empty_target(site: Path) -> None:
    (site / "target").mkdir(parents=True)
    (site / "target" / "README.txt").write_text("images go here\n")  # not an image suffix


def rgb_images_in_depth_site(site: Path) -> None:
    _depth_toml(site)
    _png(site / "target" / "a.png", _rgb())


def rgba_images(site: Path) -> None:
    _png(site / "target" / "a.png", np.full((32, 32, 4), 200, dtype=np.uint8))


def unreadable_image(site: Path) -> None:
    (site / "target").mkdir(parents=True)
    (site / "target" / "a.png").write_bytes(b"this is not a png\n")


# ------------------------------------------------------------------ compatible sites


@pytest.mark.parametrize(
    ("make_site", "expected"),
    [(rgb_site, "rgb 3-channel 40x40"), (depth_site, "depth 1-channel 48x48")],
    ids=["rgb", "depth-1ch"],
)
def test_compatible_site_passes(
    owner: Owner, tls_port: int, tmp_path: Path, make_site: Callable[[Path], None], expected: str
) -> None:
    """A site whose images fit the verified input spec: the data row PASSes and doctor exits 0."""
    make_site(tmp_path / "site")
    code, report = _doctor_json(
        _doctor_args(owner, tls_port, "--owner-key", str(owner.owner_pub), "--site", str(tmp_path / "site"))
    )
    rows = _rows(report)
    assert code == 0 and report["ok"] is True, report
    assert [r["name"] for r in report["checks"]] == [
        "reachable",
        "tls",
        "identity",
        "owner-key",
        "compatible",
        "health",
    ]
    assert all(r["status"] == "PASS" for r in report["checks"]), report
    assert rows["compatible"]["detail"] == f"{expected} → model 3x32x32" and rows["compatible"]["fix"] == ""


# ------------------------------------------------------------------ incompatible sites


INCOMPATIBLE = [
    (bad_channel_count, "channels must be 1 or 3", "fix [modality] channels/value_range"),
    (toml_without_value_range, "has no valid [modality] table (KeyError", "write [modality] with name"),
    (no_target_folder, "target is not a folder", "create it or check the site path"),
    (empty_target, "no images under", "add target images (png or npy)"),
    (rgb_images_in_depth_site, "a.png has 3 channels, site.toml says 1", "run `xkt-client validate-data`"),
    (rgba_images, "a.png has 4 channels, site.toml says 3", "run `xkt-client validate-data`"),
    (unreadable_image, "cannot read image", "replace or remove the file"),
]


@pytest.mark.parametrize(
    ("make_site", "detail", "fix"), INCOMPATIBLE, ids=[case[0].__name__.replace("_", "-") for case in INCOMPATIBLE]
)
def test_incompatible_site_fails_the_data_row_with_exit_3(
    owner: Owner, tls_port: int, tmp_path: Path, make_site: Callable[[Path], None], detail: str, fix: str
) -> None:
    """Each way a site can break the check: the data row FAILs with its fix, exit 3, other rows still PASS."""
    make_site(tmp_path / "site")
    code, report = _doctor_json(
        _doctor_args(owner, tls_port, "--owner-key", str(owner.owner_pub), "--site", str(tmp_path / "site"))
    )
    rows = _rows(report)
    assert code == 3 and report["ok"] is False, report
    assert rows["compatible"]["status"] == "FAIL"
    assert detail in rows["compatible"]["detail"] and fix in rows["compatible"]["fix"], rows["compatible"]
    assert [rows[n]["status"] for n in NETWORK_ROWS] == ["PASS"] * len(NETWORK_ROWS)  # nothing hidden behind it


def test_text_report_names_the_failed_row_and_its_fix(owner: Owner, tls_port: int, tmp_path: Path) -> None:
    """The real ``xkt-client doctor`` without --json: a table on stderr with the fix, and exit 3."""
    rgb_images_in_depth_site(tmp_path / "site")
    args = [str(BIN / "xkt-client"), *_doctor_args(owner, tls_port, "--owner-key", str(owner.owner_pub))]
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1"}
    done = subprocess.run(
        [*args, "--site", str(tmp_path / "site")], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 3, done.stderr
    row = next(line for line in done.stderr.splitlines() if "compatible" in line)
    assert "FAIL" in row and "run `xkt-client validate-data`" in row, done.stderr
    assert sum("PASS" in line for line in done.stderr.splitlines()) == len(NETWORK_ROWS)


# ------------------------------------------------------------------ only a verified manifest is judged


def test_data_row_needs_a_verified_manifest(owner: Owner, tls_port: int, tmp_path: Path) -> None:
    """Without a trusted manifest the site is not judged: SKIP, and the exit code is the real cause's."""
    rgb_images_in_depth_site(tmp_path / "site")  # incompatible, but that must not be what is reported
    site = ("--site", str(tmp_path / "site"))
    code, report = _doctor_json(_doctor_args(owner, tls_port, *site))
    assert code == 0 and _rows(report)["compatible"]["status"] == "SKIP"
    assert _rows(report)["compatible"]["fix"] == "pass --owner-key and --site"
    code, report = _doctor_json(_doctor_args(owner, tls_port, "--owner-key", str(owner.other_pub), *site))
    rows = _rows(report)
    assert code == 4 and rows["owner-key"]["status"] == "FAIL" and rows["compatible"]["status"] == "SKIP"


# ------------------------------------------------------------------ the check is local


class CapturingProxy:
    """A loopback TCP proxy that keeps every byte the client sends (the server runs in plaintext)."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._lock = threading.Lock()
        self._sent = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def sent(self) -> bytes:
        with self._lock:
            return bytes(self._sent)

    def reset(self) -> None:
        with self._lock:
            self._sent.clear()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self._target), timeout=10)
            for args in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(target=self._pipe, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pipe(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        try:
            while data := src.recv(65536):
                if outbound:
                    with self._lock:
                        self._sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def drain(self) -> None:
        """Wait for every connection so far to close, so ``sent`` is complete."""
        for thread in list(self._threads):
            thread.join(timeout=5)
            assert not thread.is_alive(), "a proxied connection did not close"

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(timeout=2)
        self._listener.close()


class Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Keeps (method, serialised request) of every unary call doctor makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls.append((details.method, request.SerializeToString()))
        return continuation(details, request)


def test_doctor_sends_nothing_derived_from_site_data(
    owner: Owner, plaintext_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With and without --site the wire carries the same two requests; no name, path or pixel of the site."""
    marker = "sitemarker7f3a"
    site = tmp_path / f"clinic-{marker}"
    _depth_toml(site, name=f"depth-{marker}")
    pixels = np.random.default_rng(2).integers(0, 10000, (128, 128), dtype=np.uint16)  # 32 KiB of site data
    (site / "target").mkdir()
    np.save(site / "target" / f"scan-{marker}.npy", pixels)

    recorder = Recorder()
    real_open = doctor_module.open_channel
    monkeypatch.setattr(doctor_module, "open_channel", lambda opts, ics=(): real_open(opts, [*ics, recorder]))
    proxy = CapturingProxy(plaintext_port)
    try:
        base = ["doctor", "--server", f"127.0.0.1:{proxy.port}", "--insecure", "--token-file", str(owner.token_file)]
        base += ["--owner-key", str(owner.owner_pub)]
        code, report = _doctor_json(base)
        proxy.drain()
        without_site, calls_without = proxy.sent, list(recorder.calls)
        proxy.reset()
        recorder.calls.clear()
        code_site, report_site = _doctor_json([*base, "--site", str(site)])
        proxy.drain()
        with_site, calls_with = proxy.sent, list(recorder.calls)
    finally:
        proxy.close()

    assert code == 0 and _rows(report)["compatible"]["status"] == "SKIP"
    assert code_site == 0 and _rows(report_site)["compatible"]["status"] == "PASS"
    assert f"depth-{marker}" in _rows(report_site)["compatible"]["detail"]  # the site really was read, locally
    assert calls_with == calls_without  # the same fixed requests, site or not
    assert calls_with == [
        ("/xkt.v1.SourceModel/GetManifest", pb.GetManifestRequest().SerializeToString()),
        (
            "/grpc.health.v1.Health/Check",
            health_pb2.HealthCheckRequest(service="xkt.v1.SourceModel").SerializeToString(),
        ),
    ]
    assert owner.token_file.read_text().strip().encode() in with_site  # the capture sees headers in clear text
    assert marker.encode() not in with_site and b"clinic-" not in with_site and b"scan-" not in with_site
    assert pixels.tobytes()[:16] not in with_site
    assert abs(len(with_site) - len(without_site)) < 256 < pixels.nbytes  # HTTP/2 noise, not data
