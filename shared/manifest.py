"""The artifact manifest: ``manifest.json``, the one file an owner's signature covers.

It exists so that what a site learns about a model (architecture, classes, input
normalisation, the weights' size and digest, provenance) is parsed in one place, strictly
and canonically: exact key sets, exact types, fields consistent with each other, and
bytes that re-encode to themselves.  Every rejection is a
:class:`~xkt.shared.errors.VerificationError` (``bad-manifest`` unless named otherwise).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from xkt.shared.data import Preprocess
from xkt.shared.errors import ConfigError, DataError, VerificationError
from xkt.shared.models import ArchSpec
from xkt.shared.signing import canonical_json, fingerprint, is_fingerprint, strict_json_loads

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 1024 * 1024

_MAX_TEXT = 256
_CREATED_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def short(text: str, limit: int = 120) -> str:
    """One line of at most ``limit`` characters: untrusted names must not flood a terminal."""
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ fields and types


def _bad_manifest(message: str) -> VerificationError:
    return VerificationError(
        f"manifest.json: {message}",
        hint="the manifest was not written by a compatible `xkt` export; re-export or re-fetch the model",
        reason="bad-manifest",
    )


def _require_object(data: Any, keys: set[str], where: str) -> dict[str, Any]:
    """``data`` as a dict with exactly ``keys``: unknown keys are refused, not ignored."""
    if not isinstance(data, dict):
        raise _bad_manifest(f"{where} must be a JSON object")
    missing, unknown = sorted(keys - set(data)), sorted(set(data) - keys)
    if missing or unknown:
        raise _bad_manifest(f"{where} has missing keys {missing} and unknown keys {unknown}")
    return data


def _text(value: Any, where: str) -> str:
    """A non-empty printable string of at most 256 characters (it ends up in logs and UIs)."""
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT or not value.isprintable():
        raise _bad_manifest(f"{where} must be a non-empty printable string of at most {_MAX_TEXT} characters")
    return value


def _count(value: Any, where: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _bad_manifest(f"{where} must be an integer >= {minimum}")
    return value


def _floats(value: Any, where: str, length: int) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != length:
        raise _bad_manifest(f"{where} must be a list of {length} numbers")
    if not all(isinstance(v, float) and math.isfinite(v) for v in value):
        raise _bad_manifest(f"{where} must hold finite floats")
    return tuple(value)


@dataclass(frozen=True)
class InputSpec:
    """What the model expects as input: modality, channels, square size and normalisation."""

    modality: str
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def preprocess(self) -> Preprocess:
        """How site images are prepared for this model; xkt adapts 3-channel models only."""
        if len(self.mean) != 3 or len(self.std) != 3:
            raise DataError(
                f"the model expects {self.channels}-channel input; xkt adapts 3-channel models",
                hint="ask the owner for a model with a 3-channel input",
                reason="unsupported-input",
            )
        return Preprocess(
            self.size, (self.mean[0], self.mean[1], self.mean[2]), (self.std[0], self.std[1], self.std[2])
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "channels": self.channels,
            "size": self.size,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_json(cls, data: Any) -> InputSpec:
        """Parse strictly; ``std`` must be positive so normalising never divides by zero."""
        data = _require_object(data, {"modality", "channels", "size", "mean", "std"}, "input_spec")
        channels = _count(data["channels"], "input_spec.channels", 1)
        std = _floats(data["std"], "input_spec.std", channels)
        if not all(v > 0 for v in std):
            raise _bad_manifest("input_spec.std values must be > 0")
        return cls(
            modality=_text(data["modality"], "input_spec.modality"),
            channels=channels,
            size=_count(data["size"], "input_spec.size", 1),
            mean=_floats(data["mean"], "input_spec.mean", channels),
            std=std,
        )


@dataclass(frozen=True)
class WeightsInfo:
    """Size and sha256 (lowercase hex) of ``weights.safetensors``."""

    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, data: Any) -> WeightsInfo:
        data = _require_object(data, {"sha256", "size"}, "weights")
        if not isinstance(data["sha256"], str) or not _SHA256_RE.fullmatch(data["sha256"]):
            raise _bad_manifest("weights.sha256 must be 64 lowercase hex digits")
        return cls(sha256=data["sha256"], size=_count(data["size"], "weights.size"))


_MANIFEST_KEYS = {
    "format_version",
    "model_id",
    "model_version",
    "architecture",
    "class_names",
    "input_spec",
    "weights",
    "batchnorm_layers",
    "created",
    "owner_key_fingerprint",
    "provenance",
}


@dataclass(frozen=True)
class Manifest:
    """Everything a site needs to know about a model, signed by its owner.

    ``architecture`` is :meth:`ArchSpec.to_json` (a registry name plus kwargs, never
    code); ``provenance`` is free-form JSON (for adapted models: source digest, method,
    resolved config, data fingerprint).  ``class_names`` and ``batchnorm_layers`` are
    tuples so a manifest cannot be changed after it was verified.
    """

    format_version: int
    model_id: str
    model_version: str
    architecture: dict[str, Any]
    class_names: tuple[str, ...]
    input_spec: InputSpec
    weights: WeightsInfo
    batchnorm_layers: tuple[str, ...]
    created: str
    owner_key_fingerprint: str
    provenance: dict[str, Any]

    @property
    def arch(self) -> ArchSpec:
        """The architecture as an :class:`ArchSpec` (validated when the manifest was parsed)."""
        return ArchSpec.from_json(self.architecture)

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (deep copies: callers cannot alter this manifest)."""
        return {
            "format_version": self.format_version,
            "model_id": self.model_id,
            "model_version": self.model_version,
            "architecture": copy.deepcopy(self.architecture),
            "class_names": list(self.class_names),
            "input_spec": self.input_spec.to_json(),
            "weights": self.weights.to_json(),
            "batchnorm_layers": list(self.batchnorm_layers),
            "created": self.created,
            "owner_key_fingerprint": self.owner_key_fingerprint,
            "provenance": copy.deepcopy(self.provenance),
        }

    def to_bytes(self) -> bytes:
        """The exact bytes of ``manifest.json``: the canonical JSON the signature covers."""
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse strictly: exact key set, exact types, and fields consistent with each other."""
        _check_format_version(data)
        data = _require_object(data, _MANIFEST_KEYS, "the manifest")
        if _count(data["format_version"], "format_version") != FORMAT_VERSION:
            raise _bad_manifest(f"format_version must be {FORMAT_VERSION}")
        arch = _parse_arch(data["architecture"])
        return cls(
            format_version=FORMAT_VERSION,
            model_id=_text(data["model_id"], "model_id"),
            model_version=_text(data["model_version"], "model_version"),
            architecture=arch.to_json(),
            class_names=_class_names(data["class_names"], arch.num_classes),
            input_spec=InputSpec.from_json(data["input_spec"]),
            weights=WeightsInfo.from_json(data["weights"]),
            batchnorm_layers=_names(data["batchnorm_layers"], "batchnorm_layers"),
            created=_created(data["created"]),
            owner_key_fingerprint=_fingerprint_field(data["owner_key_fingerprint"]),
            provenance=_provenance(data["provenance"]),
        )


def _check_format_version(data: Any) -> None:
    """A newer format is named as such, not reported as a pile of unknown keys."""
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version != FORMAT_VERSION:
        raise VerificationError(
            f"manifest format_version {version} is not supported (this xkt reads version {FORMAT_VERSION})",
            hint="upgrade xkt on this site, or ask the owner for a format-1 export",
            reason="unsupported-format-version",
        )


def _parse_arch(value: Any) -> ArchSpec:
    try:
        return ArchSpec.from_json(value)
    except ConfigError as exc:
        raise _bad_manifest(f"architecture: {exc.message}") from None


def _names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _bad_manifest(f"{where} must be a list of strings")
    names = tuple(_text(v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(set(names)) != len(names):
        raise _bad_manifest(f"{where} has duplicates")
    return names


def _class_names(value: Any, num_classes: int) -> tuple[str, ...]:
    names = _names(value, "class_names")
    if len(names) != num_classes:
        raise _bad_manifest(f"class_names has {len(names)} names but the architecture has {num_classes} classes")
    return names


def _created(value: Any) -> str:
    if not isinstance(value, str) or not _CREATED_RE.fullmatch(value):
        raise _bad_manifest("created must be an ISO-8601 UTC time like 2025-01-31T12:00:00Z")
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise _bad_manifest(f"created {value!r} is not a real date and time") from None
    return value


def _fingerprint_field(value: Any) -> str:
    if not is_fingerprint(value):
        raise _bad_manifest("owner_key_fingerprint must be 'ed25519:' followed by 64 lowercase hex digits")
    assert isinstance(value, str)
    return value


def _provenance(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad_manifest("provenance must be a JSON object")
    return value


# ------------------------------------------------------------------ signed bytes


def parse_signed_manifest(manifest_bytes: bytes, signer: Ed25519PublicKey) -> Manifest:
    """Parse signed bytes: canonical, strictly typed, and naming the key that signed them."""
    try:
        data = strict_json_loads(manifest_bytes)
    except (ValueError, RecursionError) as exc:
        raise _bad_manifest(f"not valid JSON ({short(str(exc))})") from None
    try:
        canonical = canonical_json(data) == manifest_bytes
    except ValueError:
        canonical = False
    if not canonical:
        raise VerificationError(
            f"{MANIFEST_FILE} is not in canonical JSON form (sorted keys, no whitespace, UTF-8)",
            hint="the file was reformatted after export; re-fetch it or re-export the model, never edit it by hand",
            reason="non-canonical-manifest",
        )
    manifest = Manifest.from_json(data)
    if manifest.owner_key_fingerprint != fingerprint(signer):
        raise VerificationError(
            f"manifest names owner key {manifest.owner_key_fingerprint} but was signed by {fingerprint(signer)}",
            hint="the owner exported with inconsistent keys; ask them to re-export the model",
            reason="fingerprint-mismatch",
        )
    return manifest


def claimed_fingerprint(manifest_bytes: bytes) -> str | None:
    """Best effort, for error messages only: the fingerprint an unverified manifest claims."""
    try:
        data = strict_json_loads(manifest_bytes)
    except (ValueError, RecursionError):
        return None
    value = data.get("owner_key_fingerprint") if isinstance(data, dict) else None
    return value if is_fingerprint(value) else None


def checked_manifest_bytes(manifest: Manifest) -> bytes:
    """Canonical bytes of a manifest that the loader's strict parser accepts unchanged."""
    data = manifest.to_bytes()
    if len(data) > MAX_MANIFEST_BYTES:
        raise VerificationError(
            f"the manifest would be {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit",
            hint="shorten the provenance (store large configs elsewhere and reference them by digest)",
            reason="manifest-too-large",
        )
    if Manifest.from_json(strict_json_loads(data)) != manifest:
        raise _bad_manifest("does not survive a round trip (check class names, input spec and provenance)")
    return data


def check_batchnorm_layers(manifest: Manifest, state_names: Iterable[str]) -> None:
    """The manifest's BN layer list is the architecture's, in order (sites rely on it)."""
    suffix = ".running_mean"
    layers = tuple(name.removesuffix(suffix) for name in state_names if name.endswith(suffix))
    if manifest.batchnorm_layers != layers:
        raise VerificationError(
            f"manifest batchnorm_layers ({len(manifest.batchnorm_layers)} names) differ from the "
            f"{manifest.arch.name} architecture's {len(layers)} BatchNorm layers",
            hint="the manifest does not describe this architecture; ask the owner to re-export",
            reason="bn-layers-mismatch",
        )


def json_copy(value: dict[str, Any], where: str) -> dict[str, Any]:
    """A deep copy as the loader will see it (tuples become lists); refuse what JSON cannot hold."""
    try:
        result: dict[str, Any] = json.loads(canonical_json(value))
    except ValueError as exc:
        raise _bad_manifest(f"{where} is not plain JSON data ({short(str(exc))})") from None
    return result


def utc_timestamp(when: datetime | None) -> str:
    """``created`` for a manifest: ``when`` (default now) in UTC, to the second."""
    when = datetime.now(UTC) if when is None else when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
