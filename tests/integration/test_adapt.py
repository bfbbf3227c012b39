"""``xkt-client adapt`` against a real TLS + token server on loopback, on a tiny depth site.

The owner model is an untrained resnet_tiny (32 px) saved with ``save_artifact``; the site
is the built-in shapes benchmark's depth folder (8 images per class).  Every request the
client sends is recorded by an interceptor placed after the egress guard, i.e. on the
wire side, and compared with the egress manifest the command printed.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]
import pytest
from typer.testing import CliRunner

import xkt.client.commands.adapt as adapt_command
from xkt.protos import source_model_pb2 as pb
from xkt.server.serving import run_server
from xkt.shared.artifact import verify_artifact
from xkt.shared.cli_support import new_app
from xkt.shared.data import IMAGENET_MEAN, IMAGENET_STD, fingerprint, list_images
from xkt.shared.models import ArchSpec
from xkt.shared.shapes_benchmark import ShapesConfig, write_shapes_benchmark
from xkt.shared.signing import generate_keypair, load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owner_fixtures import make_owner  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ARCH = ArchSpec("resnet_tiny", num_classes=6, kwargs={"width": 8})
CLASSES = ["box", "capsule", "cone", "cylinder", "sphere", "torus"]  # the shapes benchmark's classes
GET_MANIFEST, FETCH_WEIGHTS = "/xkt.v1.SourceModel/GetManifest", "/xkt.v1.SourceModel/FetchWeights"
FAST = ["--set", "epochs=1", "--set", "batch_size=16"]
app = new_app("xkt-client-test", "adapt")
app.command("adapt")(adapt_command.adapt)


@app.callback()
def _group() -> None:
    """Keep ``adapt`` a subcommand, as in ``xkt-client adapt``."""


@dataclass(frozen=True)
class World:
    root: Path
    data: Path
    owner_pub: Path
    ca_cert: Path
    token_file: Path
    sha256: str
    port: int


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("adapt")
    write_shapes_benchmark(root / "data", ShapesConfig(seed=0, size=32, per_class=2, site_per_class=8))
    owner = make_owner(
        root, arch=ARCH, class_names=CLASSES, mean=IMAGENET_MEAN, std=IMAGENET_STD, provenance={"kind": "source"}
    )
    with run_server(owner.serve_config()) as running:
        yield World(
            root, root / "data", owner.owner_pub, owner.pki.ca.cert_path, owner.token_file, owner.sha256, running.port
        )


class Recorder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Records (method, request) of every call that goes out on the channel."""

    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls.append((str(details.method), request))
        return continuation(details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls.append((str(details.method), request))
        return continuation(details, request)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every request adapt sends: a recorder innermost, after the command's own egress guard."""
    calls: list[tuple[str, Any]] = []
    real: Callable[..., Any] = adapt_command.open_channel

    def recording(opts: Any, interceptors: Sequence[Any] = ()) -> Any:
        return real(opts, [*interceptors, Recorder(calls)])

    monkeypatch.setattr(adapt_command, "open_channel", recording)
    return calls


def site_copy(world: World, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world.data / "depth", tmp_path / "site"))


def run_adapt(world: World, site: Path, out: Path, method: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    args = ["adapt", "--server", f"127.0.0.1:{world.port}", "--owner-key", str(world.owner_pub)]
    args += ["--site", str(site), "--method", method, "--out", str(out), "--ca-cert", str(world.ca_cert)]
    args += ["--token-file", str(world.token_file), *FAST, *extra, "--json"]
    result = CliRunner().invoke(app, args)
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}, result.stderr


def assert_egress(result: dict[str, Any], calls: list[tuple[str, Any]], world: World, *, hit: bool) -> None:
    """Only what the printed manifest declares went out: GetManifest, and FetchWeights only on a miss."""
    assert [m for m, _ in calls] == [GET_MANIFEST] if hit else [GET_MANIFEST, FETCH_WEIGHTS]
    declared = {r["method"]: r for r in result["egress"]["requests"]}
    assert result["egress"]["site_data"] == "none" and set(declared) >= {m for m, _ in calls}
    assert calls[0][1] == pb.GetManifestRequest()
    if not hit:
        request = calls[1][1]
        assert (request.sha256, request.offset) == (world.sha256, 0)
        assert {d.name for d, _ in request.ListFields()} <= set(declared[FETCH_WEIGHTS]["fields"])


def test_shot_adapts_signs_and_reports(world: World, tmp_path: Path, sent: list[tuple[str, Any]]) -> None:
    site, out = site_copy(world, tmp_path), tmp_path / "adapted"
    code, result, err = run_adapt(world, site, out, "shot", "--cache", str(tmp_path / "cache"))
    assert code == 0, err
    assert "egress manifest" in err and "resolved config" in err and "generated this site's signing key" in err
    assert result["ok"] and result["method"] == "shot" and result["source_sha256"] == world.sha256
    assert result["cached"] is False and result["downloaded_bytes"] > 0 and result["site_key_generated"] is True
    assert_egress(result, sent, world, hit=False)
    artifact = verify_artifact(out, [load_public_key(site / ".xkt" / "site.pub")])
    assert artifact.manifest.weights.sha256 == result["adapted_sha256"] != world.sha256
    provenance = artifact.manifest.provenance
    assert provenance["kind"] == "adapted" and provenance["method"] == "shot"
    assert provenance["source_sha256"] == world.sha256 and provenance["source_model_id"] == "toy"
    assert provenance["config"]["epochs"] == 1 and provenance["config"]["shot"]["cls_par"] == 0.3
    target = list_images(site / "target")
    assert provenance["data_fingerprint"] == fingerprint(target, site / "target")
    assert "accuracy" not in json.dumps(provenance)  # labels are measurement only, never in the artifact
    assert len(provenance["metrics"]["history"]) == 1 and "source" in provenance["metrics"]  # one epoch
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["before"]["count"] == report["accuracy"]["after"]["count"] > 0
    assert result["accuracy_before"] == report["accuracy"]["before"]["accuracy"]
    assert result["accuracy_after"] == report["accuracy"]["after"]["accuracy"]
    assert "# xkt adapt: shot" in (out / "report.md").read_text()
    assert not out.with_name("adapted.ckpt").exists()  # published: checkpoints removed
    with pytest.raises(Exception, match="not a trusted key"):
        verify_artifact(out, [load_public_key(world.owner_pub)])  # signed by the site, not the owner


def test_second_adapt_hits_cache(world: World, tmp_path: Path, sent: list[tuple[str, Any]]) -> None:
    site = site_copy(world, tmp_path)
    site_key, site_pub = generate_keypair(tmp_path / "keys", "site")
    code, first, err = run_adapt(world, site, tmp_path / "a", "source-only", "--site-key", str(site_key))
    assert code == 0, err
    assert first["cached"] is False and (tmp_path / ".xkt-cache" / world.sha256).is_dir()  # default: OUT/../.xkt-cache
    assert_egress(first, sent, world, hit=False)
    sent.clear()
    code, second, err = run_adapt(world, site, tmp_path / "b", "source-only", "--site-key", str(site_key))
    assert code == 0, err
    assert second["cached"] is True and second["downloaded_bytes"] == 0
    assert_egress(second, sent, world, hit=True)
    artifact = verify_artifact(tmp_path / "b", [load_public_key(site_pub)])
    assert artifact.manifest.provenance["method"] == "source-only"
    assert second["accuracy_before"] == second["accuracy_after"]  # source-only returns the source model
    assert not (site / ".xkt").exists()  # an explicit --site-key generates nothing


def test_invalid_site_refused_before_any_connection(
    world: World, tmp_path: Path, sent: list[tuple[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = site_copy(world, tmp_path)
    (site / "target" / "broken.png").write_bytes(b"not a png")
    opened: list[object] = []
    monkeypatch.setattr(adapt_command, "open_channel", lambda *a: opened.append(a))
    code, result, _ = run_adapt(world, site, tmp_path / "out", "shot")
    assert code == 3 and result["ok"] is False and result["error"]["reason"] == "invalid-site"
    assert opened == [] and sent == [] and not (tmp_path / "out").exists()
    assert not (tmp_path / ".xkt-cache").exists()


def test_existing_out_refused_and_overwrite_replaces(world: World, tmp_path: Path) -> None:
    site, out = site_copy(world, tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, result, _ = run_adapt(world, site, out, "source-only", "--overwrite")
    assert code == 3 and result["error"]["reason"] == "output-not-an-artifact"
    (out / "notes.txt").unlink()
    assert run_adapt(world, site, out, "source-only")[0] == 0
    code, result, _ = run_adapt(world, site, out, "source-only")
    assert code == 3 and result["error"]["reason"] == "output-exists"
    code, result, err = run_adapt(world, site, out, "source-only", "--overwrite")
    assert code == 0, err
    assert result["cached"] is True and {p.name for p in out.iterdir()} == set(adapt_command.OUTPUT_FILES)


def test_interrupted_adapt_resumes_from_checkpoint(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site, out = site_copy(world, tmp_path), tmp_path / "out"
    real = adapt_command.run_adaptation

    def interrupted(*args: Any, progress: Callable[[str, int, int, str], None], **kw: Any) -> Any:
        def stop_in_epoch_2(label: str, done: int, total: int, status: str) -> None:
            if "epoch 2/" in label:
                raise KeyboardInterrupt
            progress(label, done, total, status)

        return real(*args, progress=stop_in_epoch_2, **kw)

    monkeypatch.setattr(adapt_command, "run_adaptation", interrupted)
    code, result, _ = run_adapt(world, site, out, "shot", "--epochs", "2")
    assert code == 130 and result["ok"] is False
    assert not out.exists() and (tmp_path / "out.ckpt" / "latest.json").is_file()  # epoch 1 saved, nothing published
    monkeypatch.setattr(adapt_command, "run_adaptation", real)
    code, result, err = run_adapt(world, site, out, "shot", "--epochs", "2", "--resume")
    assert code == 0, err
    assert "resuming after epoch 1" in err and result["cached"] is True
    report = json.loads((out / "report.json").read_text())
    assert [h["epoch"] for h in report["label_free"]["history"]] == [1, 2]


def test_strict_guard_refuses_to_publish_and_keeps_the_checkpoints(world: World, tmp_path: Path) -> None:
    """A margin below zero makes any IM count as 'worse' (forces the guard); without --strict it only warns."""
    site, out = site_copy(world, tmp_path), tmp_path / "out"
    forced = ("--set", "monitor.guard_im_margin=-1000")
    code, result, err = run_adapt(world, site, out, "shot", *forced, "--strict")
    assert code == 8 and result["ok"] is False and result["error"]["reason"] == "negative-transfer"
    assert "information maximisation got worse" in result["error"]["message"]
    assert not out.exists() and (tmp_path / "out.ckpt" / "latest.json").is_file()  # nothing lost, nothing published
    code, result, err = run_adapt(world, site, out, "shot", *forced)
    assert code == 0, err
    assert "negative-transfer guard" in err
    report = json.loads((out / "report.json").read_text())
    assert report["label_free"]["guard"] and "guard: information" in (out / "report.md").read_text()


def test_cross_modal_method_uses_the_sites_pairs_and_refuses_a_site_without(world: World, tmp_path: Path) -> None:
    site = site_copy(world, tmp_path)
    code, result, err = run_adapt(world, site, tmp_path / "out", "socket")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["label_free"]["history"][0]["losses"]) == {"im", "pl", "ti", "bn"}
    shutil.rmtree(site / "paired")
    code, result, _ = run_adapt(world, site, tmp_path / "out2", "socket")
    assert code == 3 and result["error"]["reason"] == "missing-pairs" and not (tmp_path / "out2").exists()
