"""A pristine signed artifact as bytes, ways to rewrite it, and a spy on tensor construction.

Shared by the artifact fuzzer and the malformed-artifact corpus.  Both start from one
real artifact written by ``save_artifact`` and change it in memory: byte-level edits,
JSON-level edits, and *re-signing* with the owner's key, so that checks past the
signature and the digest are reached too.

:func:`tensor_spy` is the "no tensor from unverified bytes" oracle.  It wraps the only
places bytes can become tensors or objects (``safetensors.torch.deserialize`` under
``safetensors.torch.load``, ``torch.frombuffer``, ``torch.load`` and ``pickle``), and for
every deserialisation it checks, independently of the product, that the on-disk manifest
carries the trusted key's Ed25519 signature and names exactly the sha256 of the bytes
being deserialised.  Anything else is a violation.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from xkt.shared.artifact import MANIFEST_FILE, SIGNATURE_FILE, WEIGHTS_FILE, InputSpec, save_artifact
from xkt.shared.models import ArchSpec, build_model
from xkt.shared.signing import canonical_json, fingerprint

ARCH = ArchSpec("resnet_tiny", num_classes=3)
CLASSES = ("cube", "sphere", "cone")
FILES = (MANIFEST_FILE, SIGNATURE_FILE, WEIGHTS_FILE)


# ------------------------------------------------------------------ the pristine artifact


@dataclass(frozen=True, repr=False)
class Artifact:
    """The three files of an artifact, as bytes (``None``: the file is absent)."""

    manifest: bytes | None
    signature: bytes | None
    weights: bytes | None

    def __repr__(self) -> str:  # hypothesis prints failing inputs: sizes, not 400 KB of weights
        sizes = ", ".join(f"{n}={None if d is None else len(d)}" for n, d in zip(FILES, self._all(), strict=True))
        return f"Artifact({sizes})"

    def _all(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        return self.manifest, self.signature, self.weights

    def write(self, folder: Path) -> Path:
        """Make ``folder`` hold exactly these files (absent ones removed)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in zip(FILES, (self.manifest, self.signature, self.weights), strict=True):
            path = folder / name
            if path.is_dir():
                path.rmdir()
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        return folder


@dataclass(frozen=True, repr=False)
class Pristine:
    """A valid artifact and the keys around it: the trusted owner's and another one."""

    files: Artifact
    owner: Ed25519PrivateKey
    other: Ed25519PrivateKey

    def __repr__(self) -> str:
        return f"Pristine({self.files!r})"

    @property
    def owner_pub(self) -> Ed25519PublicKey:
        return self.owner.public_key()

    @property
    def manifest_json(self) -> dict[str, Any]:
        assert self.files.manifest is not None
        data: dict[str, Any] = json.loads(self.files.manifest)
        return data

    def resigned(
        self,
        *,
        weights: bytes | None = None,
        manifest: dict[str, Any] | None = None,
        raw_manifest: bytes | None = None,
        key: Ed25519PrivateKey | None = None,
    ) -> Artifact:
        """A *signed* artifact over other weights and/or another manifest (by default the owner's key).

        ``weights`` also updates the manifest's size and digest; ``raw_manifest`` signs those
        exact bytes (not canonical, not even JSON) instead of encoding ``manifest``.
        """
        key = key or self.owner
        weights = self.files.weights if weights is None else weights
        assert weights is not None
        if raw_manifest is None:
            data = manifest if manifest is not None else self.manifest_json
            data.setdefault("weights", {}).update(sha256=hashlib.sha256(weights).hexdigest(), size=len(weights))
            data["owner_key_fingerprint"] = fingerprint(key.public_key())
            raw_manifest = canonical_json(data)
        return Artifact(raw_manifest, signature_file(key, raw_manifest), weights)


def signature_file(key: Ed25519PrivateKey, manifest: bytes) -> bytes:
    """What ``manifest.sig`` holds: base64 of the Ed25519 signature, and a newline."""
    return base64.b64encode(key.sign(manifest)) + b"\n"


def make_pristine(folder: Path) -> Pristine:
    """Save a seeded ``resnet_tiny`` with non-default BN statistics; read its three files back."""
    torch.manual_seed(0)
    model = build_model(ARCH).eval()
    owner, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    save_artifact(
        model,
        out_dir=folder,
        private_key=owner,
        model_id="fuzz-toy",
        model_version="1",
        arch=ARCH,
        class_names=CLASSES,
        input_spec=InputSpec("rgb", 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        provenance={"trainer": "fuzz"},
    )
    files = Artifact(*((folder / name).read_bytes() for name in FILES))
    return Pristine(files, owner, other)


# ------------------------------------------------------------------ safetensors by hand


def split_safetensors(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """(header JSON, data bytes) of a well-formed safetensors file."""
    (length,) = struct.unpack("<Q", blob[:8])
    header: dict[str, Any] = json.loads(blob[8 : 8 + length])
    return header, blob[8 + length :]


def join_safetensors(header: Any, data: bytes, *, length: int | None = None) -> bytes:
    """A safetensors file from a header (any JSON) and data; ``length`` overrides the prefix."""
    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw) if length is None else length % 2**64) + raw + data


# ------------------------------------------------------------------ the spy


@dataclass
class TensorSpy:
    """What was deserialised while the spy was active, and every violation of the rule."""

    trusted: Ed25519PublicKey
    folder: Path
    deserialised: int = 0
    frombuffer_calls: int = 0
    violations: list[str] = field(default_factory=list)

    def check_signed(self, data: bytes) -> None:
        """``data`` may become tensors only if the on-disk manifest is signed and names its digest."""
        self.deserialised += 1
        try:
            manifest = (self.folder / MANIFEST_FILE).read_bytes()
            signature = base64.b64decode((self.folder / SIGNATURE_FILE).read_bytes().strip(), validate=True)
            self.trusted.verify(signature, manifest)
            signed_digest = json.loads(manifest)["weights"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError, InvalidSignature) as exc:
            self.violations.append(f"deserialised bytes under a manifest that does not verify ({exc!r})")
            return
        if hashlib.sha256(data).hexdigest() != signed_digest:
            self.violations.append("deserialised bytes whose sha256 the signed manifest does not name")


@contextlib.contextmanager
def tensor_spy(trusted: Ed25519PublicKey, folder: Path) -> Iterator[TensorSpy]:
    """Watch every way bytes become tensors or objects (see the module docstring)."""
    spy = TensorSpy(trusted, folder)
    real_deserialize, real_frombuffer = safetensors.torch.deserialize, torch.frombuffer

    def deserialize(data: bytes) -> Any:
        spy.check_signed(bytes(data))
        return real_deserialize(data)

    def frombuffer(*args: Any, **kwargs: Any) -> Any:
        spy.frombuffer_calls += 1
        if not spy.deserialised:
            spy.violations.append("torch.frombuffer called outside safetensors deserialisation")
        return real_frombuffer(*args, **kwargs)

    def forbidden(name: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            spy.violations.append(f"{name} was called")
            raise AssertionError(f"{name} must never run on an artifact")

        return refuse

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(safetensors.torch, "deserialize", deserialize)
        patch.setattr(torch, "frombuffer", frombuffer)
        unverified_readers = [
            (safetensors.torch, "load_file"),
            (safetensors.torch, "safe_open"),
            (safetensors, "safe_open"),
        ]
        for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), *unverified_readers]:
            patch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
        yield spy
