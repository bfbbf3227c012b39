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

import importlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image
from typer.testing import CliRunner

from xkt.client.cli import app
from xkt.protos import source_model_pb2 as pb
from xkt.shared.models import ArchSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owner_fixtures import BIN, LoopbackProxy, OwnerFiles, make_owner, serve_subprocess  # noqa: E402

doctor_module = importlib.import_module("xkt.client.commands.doctor")

ARCH = ArchSpec("resnet_tiny", num_classes=4)  # the smallest model there is: ~0.4 MB
NETWORK_ROWS = ("reachable", "tls", "identity", "owner-key", "health")
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> OwnerFiles:
    return make_owner(tmp_path_factory.mktemp("doctor"), arch=ARCH, class_names=list("abcd"))


@pytest.fixture(scope="module")
def tls_port(owner: OwnerFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    err = tmp_path_factory.mktemp("tls-server") / "server.err"
    with serve_subprocess(owner, *owner.tls_flags, stderr_to=err) as served:
        yield served.port


@pytest.fixture
def plaintext_port(owner: OwnerFiles, tmp_path: Path) -> Iterator[int]:
    with serve_subprocess(owner, "--insecure", stderr_to=tmp_path / "plain-server" / "server.err") as served:
        yield served.port


def _doctor_args(owner: OwnerFiles, port: int, *extra: str) -> list[str]:
    args = ["doctor", "--server", f"127.0.0.1:{port}", "--ca-cert", str(owner.pki.ca.cert_path)]
    return args + ["--token-file", str(owner.token_file), *extra]


def _doctor_json(args: list[str]) -> tuple[int, dict[str, Any]]:
    """Run doctor in-process with ``--json``: (exit code, result object)."""
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.stdout.strip(), (result.exit_code, result.stderr, result.exception)
    return result.exit_code, json.loads(result.stdout)


def _rows(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {row["name"]: row for row in report["checks"]}


def _doctor_on_site(
    owner: OwnerFiles, port: int, make_site: Callable[[Path], None], site: Path
) -> tuple[int, dict[str, Any], dict[str, dict[str, str]]]:
    """Build ``site`` with ``make_site``, then doctor it with the owner key: (exit code, report, rows by name)."""
    make_site(site)
    code, report = _doctor_json(_doctor_args(owner, port, "--owner-key", str(owner.owner_pub), "--site", str(site)))
    return code, report, _rows(report)


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
    owner: OwnerFiles, tls_port: int, tmp_path: Path, make_site: Callable[[Path], None], expected: str
) -> None:
    """A site whose images fit the verified input spec: the data row PASSes and doctor exits 0."""
    code, report, rows = _doctor_on_site(owner, tls_port, make_site, tmp_path / "site")
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
    owner: OwnerFiles, tls_port: int, tmp_path: Path, make_site: Callable[[Path], None], detail: str, fix: str
) -> None:
    """Each way a site can break the check: the data row FAILs with its fix, exit 3, other rows still PASS."""
    code, report, rows = _doctor_on_site(owner, tls_port, make_site, tmp_path / "site")
    assert code == 3 and report["ok"] is False, report
    assert rows["compatible"]["status"] == "FAIL"
    assert detail in rows["compatible"]["detail"] and fix in rows["compatible"]["fix"], rows["compatible"]
    assert [rows[n]["status"] for n in NETWORK_ROWS] == ["PASS"] * len(NETWORK_ROWS)  # nothing hidden behind it


def test_text_report_names_the_failed_row_and_its_fix(owner: OwnerFiles, tls_port: int, tmp_path: Path) -> None:
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


def test_data_row_needs_a_verified_manifest(owner: OwnerFiles, tls_port: int, tmp_path: Path) -> None:
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


class CapturingProxy(LoopbackProxy):
    """A loopback TCP proxy that keeps every byte the client sends (the server runs in plaintext)."""

    def __init__(self, target_port: int) -> None:
        self._lock = threading.Lock()
        self._sent = bytearray()
        super().__init__(target_port)

    @property
    def sent(self) -> bytes:
        with self._lock:
            return bytes(self._sent)

    def reset(self) -> None:
        with self._lock:
            self._sent.clear()

    def client_sent(self, data: bytes) -> None:
        with self._lock:
            self._sent += data


class Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Keeps (method, serialised request) of every unary call doctor makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls.append((details.method, request.SerializeToString()))
        return continuation(details, request)


def test_doctor_sends_nothing_derived_from_site_data(
    owner: OwnerFiles, plaintext_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
