"""The signed model artifact: ``weights.safetensors`` + ``manifest.json`` + ``manifest.sig``.

This module is the artifact as a whole: its three file names, verifying and loading one,
and writing one atomically.  The manifest itself lives in :mod:`xkt.shared.manifest` and
the hand-checked weights file in :mod:`xkt.shared.safetensors_check`.

A site runs code only from its own xkt install, and tensors only from files an owner it
trusts has signed.  So the loader checks, in this order and before it builds a single
tensor (DESIGN.md, "The model artifact"):

1. the three files are present and small where they should be;
2. ``manifest.sig`` is a trusted key's Ed25519 signature over the exact bytes of
   ``manifest.json`` (and only then is the manifest parsed, strictly and canonically);
3. the weights file has the size and sha256 the signed manifest names;
4. the safetensors header, parsed by hand, has bounded length, known dtypes, offsets
   that tile the data exactly, and precisely the tensor names, dtypes and shapes the
   manifest's architecture has.

Only then are tensors read, with ``safetensors`` (never pickle), from the very bytes
whose digest was checked.  Every rejection is a :class:`VerificationError` with its own
``reason`` slug.  When saving, an output folder that must not be written is the user's
configuration problem and raises :class:`ConfigError` instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from xkt.shared.errors import ConfigError, VerificationError
from xkt.shared.files import fsync_dir
from xkt.shared.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    InputSpec,
    Manifest,
    WeightsInfo,
    check_batchnorm_layers,
    checked_manifest_bytes,
    claimed_fingerprint,
    json_copy,
    parse_signed_manifest,
    short,
    utc_timestamp,
)
from xkt.shared.models import ArchSpec, SourceClassifier, batchnorm_layers, build_model
from xkt.shared.safetensors_check import (
    MAX_HEADER_BYTES,
    WEIGHTS_FILE,
    TensorEntry,
    check_header,
    expected_for,
    read_weights_checked,
)
from xkt.shared.signing import fingerprint, sign, verify

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MAX_HEADER_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_SIGNATURE_FILE_BYTES",
    "SIGNATURE_FILE",
    "WEIGHTS_FILE",
    "InputSpec",
    "LoadedArtifact",
    "Manifest",
    "TensorEntry",
    "VerifiedArtifact",
    "check_signature",
    "WeightsInfo",
    "load_artifact",
    "read_state_dict",
    "save_artifact",
    "verify_artifact",
]

SIGNATURE_FILE = "manifest.sig"
MAX_SIGNATURE_FILE_BYTES = 1024


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact whose signature, digest and header passed; no tensor has been read yet."""

    path: Path
    manifest: Manifest
    weights_path: Path
    header: dict[str, TensorEntry]


@dataclass(frozen=True)
class LoadedArtifact:
    """A verified artifact's manifest and the model rebuilt from the registry (in eval mode)."""

    manifest: Manifest
    model: SourceClassifier


# ------------------------------------------------------------------ verification


def verify_artifact(path: Path, trusted_keys: Sequence[Ed25519PublicKey]) -> VerifiedArtifact:
    """Check an artifact completely without building a tensor; raise on the first problem."""
    path = Path(path)
    keys = _require_trusted_keys(trusted_keys)
    weights_path = _require_files(path)
    manifest_bytes = _read_small(path / MANIFEST_FILE, MAX_MANIFEST_BYTES, "manifest-too-large")
    signature = _read_signature(path / SIGNATURE_FILE)
    signer = check_signature(manifest_bytes, signature, keys)
    manifest = parse_signed_manifest(manifest_bytes, signer)
    expected = expected_for(manifest.arch)
    check_batchnorm_layers(manifest, expected)
    head, size = read_weights_checked(weights_path, manifest.weights)
    header = check_header(head, size, expected)
    return VerifiedArtifact(path=path, manifest=manifest, weights_path=weights_path, header=header)


def _require_trusted_keys(trusted_keys: Sequence[Ed25519PublicKey]) -> list[Ed25519PublicKey]:
    keys = list(trusted_keys)
    if not keys:
        raise VerificationError(
            "no trusted owner key was given, so no artifact can be accepted",
            hint="pass the model owner's public key file (owner.pub) with --owner-key",
            reason="no-trusted-keys",
        )
    for key in keys:
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError(f"trusted keys must be Ed25519PublicKey, not {type(key).__name__}")
    return keys


def _require_files(path: Path) -> Path:
    """All three files exist and are regular files (a FIFO or /dev/zero would hang a reader)."""
    if not path.is_dir():
        raise VerificationError(
            f"artifact {path} is not a directory",
            hint=f"pass the folder holding {WEIGHTS_FILE}, {MANIFEST_FILE} and {SIGNATURE_FILE}",
            reason="missing-file",
        )
    for name in (MANIFEST_FILE, SIGNATURE_FILE, WEIGHTS_FILE):
        try:
            mode = (path / name).stat().st_mode
        except OSError:
            raise VerificationError(
                f"artifact {path} has no {name}",
                hint="the artifact is incomplete: re-fetch or re-export it (all three files are required)",
                reason="missing-file",
            ) from None
        if not stat.S_ISREG(mode):
            raise VerificationError(
                f"{path / name} is not a regular file",
                hint="re-fetch or re-export the artifact",
                reason="not-a-file",
            )
    return path / WEIGHTS_FILE


def _read_small(path: Path, limit: int, reason: str) -> bytes:
    """Read a file that must hold at most ``limit`` bytes, without reading more than that."""
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise VerificationError(
            f"{path.name} is larger than {limit} bytes",
            hint="this is not an xkt artifact file; re-fetch or re-export the artifact",
            reason=reason,
        )
    return data


def _read_signature(path: Path) -> bytes:
    """``manifest.sig``: strict base64 of a 64-byte signature (surrounding whitespace allowed)."""
    text = _read_small(path, MAX_SIGNATURE_FILE_BYTES, "malformed-signature").strip()
    try:
        signature = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        signature = b""
    if len(signature) != 64:
        raise VerificationError(
            f"{SIGNATURE_FILE} is not the base64 of a 64-byte Ed25519 signature",
            hint="the signature file is damaged; re-fetch or re-export the artifact",
            reason="malformed-signature",
        )
    return signature


def check_signature(manifest_bytes: bytes, signature: bytes, keys: list[Ed25519PublicKey]) -> Ed25519PublicKey:
    """The trusted key that signed these bytes; else say whether the key or the bytes are wrong.

    Acceptance never depends on parsing unverified JSON: the manifest is read only to
    name the claimed signer in the error message.
    """
    for key in keys:
        try:
            verify(key, manifest_bytes, signature)
        except VerificationError:
            continue
        return key
    trusted = sorted(fingerprint(key) for key in keys)
    claimed = claimed_fingerprint(manifest_bytes)
    if claimed is not None and claimed not in trusted:
        raise VerificationError(
            f"the artifact is signed by owner key {claimed}, which is not a trusted key "
            f"(trusted: {', '.join(trusted)})",
            hint=f"if you trust that owner, pass their public key file (the owner.pub whose fingerprint is {claimed})"
            " with --owner-key; otherwise do not use this model",
            reason="untrusted-key",
        )
    raise VerificationError(
        f"{SIGNATURE_FILE} does not verify: {MANIFEST_FILE} or the signature was altered after signing",
        hint="do not use this artifact; re-fetch it from the owner or ask them to re-export it",
        reason="bad-signature",
    )


# ------------------------------------------------------------------------ loading


def read_state_dict(verified: VerifiedArtifact) -> dict[str, torch.Tensor]:
    """The verified weights as CPU tensors, read by safetensors from digest-checked bytes.

    The file is read once into memory and hashed again, so the bytes deserialised are
    exactly the bytes the signed manifest names, even if the file changed after
    :func:`verify_artifact` looked at it.
    """
    info = verified.manifest.weights
    with verified.weights_path.open("rb") as handle:
        data = handle.read(info.size + 1)
    if len(data) != info.size or hashlib.sha256(data).hexdigest() != info.sha256:
        raise VerificationError(
            f"{WEIGHTS_FILE} changed after it was verified",
            hint="something replaced the file while it was being loaded; verify and load it again",
            reason="weights-changed",
        )
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as exc:  # defence in depth: checked above
        raise VerificationError(
            f"safetensors refused {WEIGHTS_FILE} after it passed verification: {short(str(exc))}",
            hint="please report this as an xkt bug, with the artifact; do not use the model meanwhile",
            reason="safetensors-error",
        ) from None
    if set(tensors) != set(verified.header):  # cannot happen: same bytes as the checked header
        raise AssertionError("safetensors returned other tensors than the verified header names")
    return tensors


def load_artifact(
    path: Path, trusted_keys: Sequence[Ed25519PublicKey], device: str | torch.device = "cpu"
) -> LoadedArtifact:
    """Verify, then rebuild the model from the registry and load the weights strictly."""
    verified = verify_artifact(path, trusted_keys)
    state = read_state_dict(verified)
    model = build_model(verified.manifest.arch, device)
    model.load_state_dict(state, strict=True)
    model.eval()
    return LoadedArtifact(manifest=verified.manifest, model=model)


# ------------------------------------------------------------------------- saving


def save_artifact(
    model: torch.nn.Module,
    *,
    out_dir: Path,
    private_key: Ed25519PrivateKey,
    model_id: str,
    model_version: str,
    arch: ArchSpec,
    class_names: Sequence[str],
    input_spec: InputSpec,
    provenance: dict[str, Any],
    overwrite: bool = False,
    created: datetime | None = None,
) -> Manifest:
    """Write a signed artifact atomically; it passes :func:`verify_artifact` or is not written.

    Everything goes into a hidden ``*.partial`` sibling directory that is fsynced and then
    renamed onto ``out_dir``, so a crash never leaves a directory that looks complete.
    """
    out_dir = Path(out_dir)
    _refuse_clobber(out_dir, overwrite)
    input_spec = InputSpec.from_json(input_spec.to_json())  # validates; lists become tuples
    weights = _weights_bytes(model)
    expected = expected_for(arch)
    check_header(weights, len(weights), expected)  # never publish what a site would refuse
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model_id=model_id,
        model_version=model_version,
        architecture=arch.to_json(),
        class_names=tuple(class_names),
        input_spec=input_spec,
        weights=WeightsInfo(sha256=hashlib.sha256(weights).hexdigest(), size=len(weights)),
        batchnorm_layers=tuple(name for name, _layer in batchnorm_layers(model)),
        created=utc_timestamp(created),
        owner_key_fingerprint=fingerprint(private_key.public_key()),
        provenance=json_copy(provenance, "provenance"),
    )
    manifest_bytes = checked_manifest_bytes(manifest)
    check_batchnorm_layers(manifest, expected)
    signature = base64.b64encode(sign(private_key, manifest_bytes)) + b"\n"
    _publish(out_dir, {WEIGHTS_FILE: weights, MANIFEST_FILE: manifest_bytes, SIGNATURE_FILE: signature}, overwrite)
    return manifest


def _weights_bytes(model: torch.nn.Module) -> bytes:
    """The state dict as safetensors bytes (contiguous CPU copies; no pickle anywhere)."""
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    return safetensors.torch.save(state)


def _refuse_clobber(out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ConfigError(
            f"{out_dir} exists and is not a directory",
            hint="choose another output path",
            reason="output-exists",
        )
    existing = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    if existing and not overwrite:
        raise ConfigError(
            f"{out_dir} already exists and is not empty",
            hint="choose another output directory, or pass overwrite=True (--overwrite) to replace it",
            reason="output-exists",
        )
    if existing - {WEIGHTS_FILE, MANIFEST_FILE, SIGNATURE_FILE}:  # overwrite deletes: only ever an artifact
        raise ConfigError(
            f"{out_dir} holds files that are not part of an artifact, so it will not be replaced",
            hint="choose another output directory; overwrite only replaces a previous artifact",
            reason="output-not-an-artifact",
        )


def _publish(out_dir: Path, files: dict[str, bytes], overwrite: bool) -> None:
    """Write ``files`` into a fresh sibling directory, fsync it, then rename it onto ``out_dir``."""
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
    try:
        for name, data in files.items():
            _write_synced(staging / name, data)
        os.chmod(staging, 0o755)
        fsync_dir(staging)
        _replace_dir(staging, out_dir, overwrite)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _replace_dir(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``staging`` onto ``out_dir``; an old non-empty ``out_dir`` is moved aside first."""
    old: Path | None = None
    if overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex}")
        os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except OSError as exc:
        if old is not None:
            os.replace(old, out_dir)
        raise ConfigError(
            f"could not publish the artifact to {out_dir}: {exc.strerror}",
            hint="another process may be writing there; choose another output directory",
            reason="output-exists",
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
