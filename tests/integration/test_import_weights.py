"""``xkt-server import-weights`` and ``train --init`` through the real console scripts.

The checkpoints here are torchvision-format state dicts written by the test itself
(random weights, torchvision's key names), so this file needs no optional package; the
real ImageNet weights and photos are in ``test_real_weights.py``.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from xkt.server.weights_import import convert_torchvision, read_torchvision_state_dict
from xkt.shared.artifact import load_artifact
from xkt.shared.errors import DataError
from xkt.shared.models import build_model, resolve_arch
from xkt.shared.signing import generate_keypair, load_public_key

BIN = Path(sys.executable).parent
CANARY = Path(__file__)  # replaced per test: the file the malicious pickle would create


def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=300)
    assert completed.returncode == expect, completed.stderr + completed.stdout
    return completed


def torchvision_state(arch: str, num_classes: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random torchvision-format state dict: xkt's backbone names plus torchvision's head name."""
    torch.manual_seed(seed)
    model = build_model(resolve_arch(arch, {}, num_classes, bottleneck_dim=0))
    head = {"mobilenet_v2": "classifier.1", "resnet18": "fc"}[arch]
    state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    for name, layer in model.backbone.named_modules():  # non-trivial BN statistics, so a mix-up would show
        if isinstance(layer, torch.nn.BatchNorm2d):
            state[f"{name}.running_mean"] = torch.randn_like(layer.running_mean) * 0.1
            state[f"{name}.running_var"] = torch.rand_like(layer.running_var) + 0.5
    state[f"{head}.weight"] = torch.randn(num_classes, model.backbone.out_features) * 0.05
    state[f"{head}.bias"] = torch.randn(num_classes) * 0.1
    return state


def reference_logits(state: dict[str, torch.Tensor], arch: str, x: torch.Tensor) -> torch.Tensor:
    """What the original torchvision model computes: backbone features, then W·f + b."""
    head = {"mobilenet_v2": "classifier.1", "resnet18": "fc"}[arch]
    model = build_model(resolve_arch(arch, {}, 2, bottleneck_dim=0))
    model.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith(head)})
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.linear(model.backbone(x), state[f"{head}.weight"], state[f"{head}.bias"])


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_converted_model_predicts_what_the_original_did(arch: str) -> None:
    state = torchvision_state(arch)
    model, spec = convert_torchvision(state, arch)
    assert spec.bottleneck_dim == 0 and spec.num_classes == 7
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
    torch.testing.assert_close(ours, reference_logits(state, arch, x), rtol=1e-5, atol=1e-5)


def test_wrapped_state_dict_is_unwrapped(tmp_path: Path) -> None:
    state = torchvision_state("mobilenet_v2")
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    loaded, digest = read_torchvision_state_dict(tmp_path / "wrapped.pth")
    assert set(loaded) == set(state) and len(digest) == 64


class _Canary:
    """Unpickling this would create a file: torch's restricted unpickler must refuse before that."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (CANARY,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    global CANARY
    CANARY = tmp_path / "canary-ran"
    with (tmp_path / "evil.pth").open("wb") as handle:
        pickle.dump({"features.0.0.weight": _Canary()}, handle)
    with pytest.raises(DataError) as caught:
        read_torchvision_state_dict(tmp_path / "evil.pth")
    assert caught.value.reason == "bad-checkpoint"
    assert not CANARY.exists()
    pickle.loads((tmp_path / "evil.pth").read_bytes())  # noqa: S301 - proves the canary is live
    assert CANARY.exists()


@pytest.mark.parametrize(
    ("edit", "reason", "words"),
    [
        (lambda s: s.pop("features.3.conv.1.0.weight"), "wrong-architecture", "missing features.3.conv.1.0.weight"),
        (lambda s: s.update({"features.99.weight": torch.zeros(1)}), "wrong-architecture", "unexpected features.99"),
        (lambda s: s.update({"features.0.0.weight": torch.zeros(8, 3, 3, 3)}), "wrong-architecture", "shape"),
        (lambda s: s.pop("classifier.1.weight"), "wrong-architecture", "no classifier.1.weight"),
        (lambda s: s.update({"features.0.0.weight": torch.zeros(32, 3, 3, 3, dtype=torch.int64)}), "wrong-dtype", ""),
    ],
)
def test_a_state_dict_that_does_not_fit_is_refused_by_name(edit: Any, reason: str, words: str) -> None:
    state = torchvision_state("mobilenet_v2")
    edit(state)
    with pytest.raises(DataError) as caught:
        convert_torchvision(state, "mobilenet_v2")
    assert caught.value.reason == reason
    assert words in caught.value.message


def test_half_precision_checkpoint_is_widened() -> None:
    state = {k: v.half() if v.is_floating_point() else v for k, v in torchvision_state("mobilenet_v2").items()}
    model, _ = convert_torchvision(state, "mobilenet_v2")
    assert all(t.dtype in (torch.float32, torch.int64) for t in model.state_dict().values())


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("import")
    keys = root / "keys"
    generate_keypair(keys)
    torch.save(torchvision_state("resnet18", num_classes=5), root / "r18.pth")
    names = root / "names.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(5)), encoding="utf-8")
    run(
        "xkt-server", "import-weights", "--arch", "resnet18", "--torchvision-state-dict", str(root / "r18.pth"),
        "--key", str(keys / "owner.key"), "--out", str(root / "imported"), "--class-names", str(names), "--quiet",
    )  # fmt: skip
    return {"root": root, "keys": keys, "artifact": root / "imported", "pth": root / "r18.pth"}


def test_import_writes_a_signed_artifact_that_predicts_like_the_original(imported: dict[str, Path]) -> None:
    loaded = load_artifact(imported["artifact"], [load_public_key(imported["keys"] / "owner.pub")])
    manifest = loaded.manifest
    assert manifest.class_names == tuple(f"thing {i}" for i in range(5))
    assert manifest.provenance["kind"] == "imported" and len(manifest.provenance["file_sha256"]) == 64
    assert manifest.input_spec.size == 224 and manifest.input_spec.mean == (0.485, 0.456, 0.406)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = loaded.model(x)
    original = torch.load(imported["pth"], weights_only=True)
    torch.testing.assert_close(ours, reference_logits(original, "resnet18", x), rtol=1e-5, atol=1e-5)


def test_import_refuses_a_wrong_class_name_count_and_writes_nothing(imported: dict[str, Path]) -> None:
    names = imported["root"] / "three.txt"
    names.write_text("a\nb\nc\n", encoding="utf-8")
    out = imported["root"] / "never"
    completed = run(
        "xkt-server", "import-weights", "--arch", "resnet18", "--torchvision-state-dict", str(imported["pth"]),
        "--key", str(imported["keys"] / "owner.key"), "--out", str(out), "--class-names", str(names), "--json",
        expect=3,
    )  # fmt: skip
    assert json.loads(completed.stdout)["error"]["reason"] == "class-count-mismatch"
    assert not out.exists()


def test_train_init_starts_from_the_imported_backbone(imported: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    run("xkt-bench", "data", "--out", str(data), "--per-class", "4", "--site-per-class", "4", "--size", "32", "-q")
    out = tmp_path / "source"
    train = ["xkt-server", "train", "--data", str(data), "--key", str(imported["keys"] / "owner.key")]
    result = json.loads(
        run(*train, "--out", str(out), "--init", str(imported["artifact"]), "--epochs", "1",
            "--set", "optim.lr=0.0", "--set", "optim.weight_decay=0.0", "--set", "batch_size=16", "--json").stdout
    )  # fmt: skip
    assert result["ok"]
    public = [load_public_key(imported["keys"] / "owner.pub")]
    trained, start = load_artifact(out, public), load_artifact(imported["artifact"], public)
    assert trained.manifest.arch.name == "resnet18" and trained.manifest.arch.bottleneck_dim == 256
    assert trained.manifest.provenance["init"]["weights_sha256"] == start.manifest.weights.sha256
    assert trained.manifest.input_spec.size == 32 and trained.manifest.input_spec.std == (0.229, 0.224, 0.225)
    ours, theirs = trained.model.backbone.state_dict(), start.model.backbone.state_dict()
    for name, tensor in theirs.items():
        if name.endswith("weight") and tensor.ndim == 4:  # lr 0: every conv weight is still the imported one
            torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0)


def test_train_init_refuses_another_architecture_and_an_untrusted_init(
    imported: dict[str, Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    run("xkt-bench", "data", "--out", str(data), "--per-class", "2", "--site-per-class", "2", "--size", "16", "-q")
    train = ["xkt-server", "train", "--data", str(data), "--key", str(imported["keys"] / "owner.key")]
    train += ["--out", str(tmp_path / "m"), "--init", str(imported["artifact"]), "--epochs", "1", "--json"]
    mismatch = json.loads(run(*train, "--arch", "mobilenet_v2", expect=3).stdout)
    assert mismatch["error"]["reason"] == "init-arch-mismatch"
    stranger = tmp_path / "stranger"
    generate_keypair(stranger)
    untrusted = json.loads(run(*train, "--init-key", str(stranger / "owner.pub"), expect=4).stdout)
    assert untrusted["error"]["name"] == "verification"
    assert not (tmp_path / "m").exists()
