"""What travels in a federated round, in Flower's records, and how each side reads it back.

Both apps (the owner's ServerApp and the site's ClientApp) import this one module, so the
names of records and keys cannot drift apart.  Three things travel:

* the **signed source artifact**, once per site: the manifest and signature as bytes in the
  round's ConfigRecord, the weights file as one uint8 array in its own ArrayRecord (Flower
  chunks arrays, so a large model is no problem).  The site writes the three files into a
  staging folder and runs the ordinary artifact verification (signature, digest, header)
  on them before a tensor is built, exactly as ``xkt-client fetch`` does;
* the **shared parameters** (float tensors without BatchNorm statistics, see
  :mod:`xkt.shared.federation`) as an ArrayRecord of float32 arrays, both ways;
* per-round **settings** (ConfigRecord, owner → site) and **metrics** (MetricRecord, site →
  owner, filtered by the site's policy).

Flower serialises arrays with ``numpy.save(allow_pickle=False)`` and reads them with
``allow_pickle=False``: nothing received is ever unpickled.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Array, ArrayRecord, ConfigRecord

from xkt.shared.artifact import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
    LoadedArtifact,
    load_artifact,
    verify_artifact,
)
from xkt.shared.errors import VerificationError

# Message types (Flower routes "train.adapt" to @app.train("adapt")).
ADAPT = "train.adapt"
FINISH = "evaluate.finish"

# Record names inside a message's RecordDict.
CONFIG = "config"
SHARED = "arrays"  # exactly one ArrayRecord and one MetricRecord per reply, as Flower's tools expect
METRICS = "metrics"
ARTIFACT = "artifact"

# Keys of the ConfigRecord that carry the artifact's small files.
MANIFEST_KEY = "artifact-manifest"
SIGNATURE_KEY = "artifact-signature"
WEIGHTS_KEY = "weights"


# ------------------------------------------------------------------ arrays


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord (order kept)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as named numpy arrays (read with allow_pickle=False by Flower)."""
    return {name: array.numpy() for name, array in record.items()}


# ------------------------------------------------------------------ the signed artifact


def artifact_payload(folder: Path) -> tuple[dict[str, bytes], ArrayRecord]:
    """The artifact's files for one message: small ones as ConfigRecord bytes, the weights as uint8."""
    small = {
        MANIFEST_KEY: (folder / MANIFEST_FILE).read_bytes(),
        SIGNATURE_KEY: (folder / SIGNATURE_FILE).read_bytes(),
    }
    weights = np.frombuffer((folder / WEIGHTS_FILE).read_bytes(), dtype=np.uint8)
    return small, ArrayRecord({WEIGHTS_KEY: Array(weights)})


def receive_artifact(
    config: ConfigRecord, record: ArrayRecord, cache: Path, trusted_keys: list[Ed25519PublicKey]
) -> LoadedArtifact:
    """Write a received artifact into ``cache/<sha256>``, verify it completely, then load it.

    The files go to a staging folder first; only a folder that passed verification is
    renamed to its digest's name, so the cache never holds an unverified artifact.
    """
    manifest, signature = config.get(MANIFEST_KEY), config.get(SIGNATURE_KEY)
    if not isinstance(manifest, bytes) or not isinstance(signature, bytes) or WEIGHTS_KEY not in record:
        raise VerificationError(
            "the round's message carries an incomplete model artifact",
            hint="the owner's xkt version may differ from the site's; ask the owner to restart the federation",
            reason="incomplete-artifact",
        )
    weights = record[WEIGHTS_KEY].numpy()
    if weights.dtype != np.uint8 or weights.ndim != 1:
        raise VerificationError("the artifact's weights are not a byte array", hint="re-run the federation")
    cache.mkdir(parents=True, exist_ok=True)
    staging = cache / f".incoming-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        (staging / MANIFEST_FILE).write_bytes(manifest)
        (staging / SIGNATURE_FILE).write_bytes(signature)
        (staging / WEIGHTS_FILE).write_bytes(weights.tobytes())
        verified = verify_artifact(staging, trusted_keys)  # signature, digest and header, before any tensor
        final = cache / verified.manifest.weights.sha256
        if not final.exists():
            staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_artifact(final, trusted_keys)


def cached_artifact(cache: Path, sha256: str, trusted_keys: list[Ed25519PublicKey]) -> LoadedArtifact | None:
    """The verified artifact with this weights digest from an earlier round, or None."""
    folder = cache / sha256
    if not (folder / MANIFEST_FILE).is_file():
        return None
    loaded = load_artifact(folder, trusted_keys)  # verified again: the cache is only a convenience
    return loaded if loaded.manifest.weights.sha256 == sha256 else None
