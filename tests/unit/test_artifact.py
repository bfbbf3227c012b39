"""The signed model artifact (xkt.shared.artifact): round trip, and a corpus of bad files.

Every bad artifact must be refused with its own ``reason`` *before any tensor is built*:
the ``no_deserialization`` tripwires make every tensor- or pickle-producing entry point
raise ``AssertionError``, so a check that ran too late fails the test loudly.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xkt.shared import artifact as artifact_mod
from xkt.shared.artifact import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
    InputSpec,
    Manifest,
    load_artifact,
    read_state_dict,
    save_artifact,
    verify_artifact,
)
from xkt.shared.errors import ConfigError, VerificationError
from xkt.shared.models import ArchSpec, batchnorm_layers, build_model, expected_state
from xkt.shared.signing import canonical_json, fingerprint, generate_keypair, load_private_key, load_public_key, sign

ARCH = ArchSpec("resnet_tiny", num_classes=6)
CLASSES = ["cube", "sphere", "cone", "torus", "cylinder", "pyramid"]
INPUT = InputSpec("rgb", 3, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CREATED = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Keys:
    owner: Ed25519PrivateKey
    owner_pub: Ed25519PublicKey
    other: Ed25519PrivateKey
    other_pub: Ed25519PublicKey
    owner_key_path: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    owner_key, owner_pub = generate_keypair(tmp_path_factory.mktemp("owner"))
    other_key, other_pub = generate_keypair(tmp_path_factory.mktemp("other"), name="mallory")
    return Keys(
        load_private_key(owner_key),
        load_public_key(owner_pub),
        load_private_key(other_key),
        load_public_key(other_pub),
        owner_key,
    )


def make_model(seed: int = 0, arch: ArchSpec = ARCH) -> torch.nn.Module:
    """A model with non-default BN statistics, so a round trip that drops them would show."""
    torch.manual_seed(seed)
    model = build_model(arch)
    for _name, layer in batchnorm_layers(model):
        assert layer.running_mean is not None and layer.running_var is not None
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
        assert layer.num_batches_tracked is not None
        layer.num_batches_tracked.fill_(7)
    return model.eval()


def save(model: torch.nn.Module, out_dir: Path, key: Ed25519PrivateKey, **overrides: Any) -> Manifest:
    kwargs: dict[str, Any] = {
        "out_dir": out_dir,
        "private_key": key,
        "model_id": "toy-objects",
        "model_version": "1.0.0",
        "arch": ARCH,
        "class_names": CLASSES,
        "input_spec": INPUT,
        "provenance": {"trainer": "unit-test", "seed": 0},
        "created": CREATED,
    }
    kwargs.update(overrides)
    return save_artifact(model, **kwargs)


@pytest.fixture
def artifact(tmp_path: Path, keys: Keys) -> Path:
    save(make_model(), tmp_path / "art", keys.owner)
    return tmp_path / "art"


def resign(
    art: Path,
    key: Ed25519PrivateKey,
    *,
    weights: bytes | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
    raw: Callable[[dict[str, Any]], bytes] | None = None,
) -> None:
    """Re-sign the manifest (over arbitrary weight bytes) so the checks past signature and digest are reached."""
    data = json.loads((art / MANIFEST_FILE).read_bytes())
    if weights is not None:
        (art / WEIGHTS_FILE).write_bytes(weights)
        data["weights"] = {"sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}
    data["owner_key_fingerprint"] = fingerprint(key.public_key())
    if edit is not None:
        edit(data)
    body = raw(data) if raw is not None else canonical_json(data)
    (art / MANIFEST_FILE).write_bytes(body)
    (art / SIGNATURE_FILE).write_bytes(base64.b64encode(sign(key, body)))


def split_safetensors(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def join_safetensors(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def state_bytes(change: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    state = {name: tensor.clone() for name, tensor in make_model().state_dict().items()}
    change(state)
    return safetensors.torch.save(state)


@contextlib.contextmanager
def no_deserialization() -> Iterator[None]:
    """Make every way to build a tensor or unpickle raise AssertionError while active."""

    def tripwire(name: str) -> Callable[..., Any]:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{name} was called before the artifact was fully verified")

        return fail

    targets: list[tuple[Any, str]] = [
        (safetensors.torch, "load"),
        (safetensors.torch, "load_file"),
        (safetensors.torch, "safe_open"),
        (safetensors, "safe_open"),
        (artifact_mod, "build_model"),
        (torch, "load"),
        (pickle, "load"),
        (pickle, "loads"),
    ]
    with pytest.MonkeyPatch.context() as patch:
        for module, name in targets:
            patch.setattr(module, name, tripwire(f"{module.__name__}.{name}"))
        yield


def assert_rejected(art: Path, trusted: list[Ed25519PublicKey], reason: str, *fragments: str) -> VerificationError:
    """Both verify_artifact and load_artifact refuse with ``reason``, building no tensor."""
    err: VerificationError | None = None
    for entry_point in (verify_artifact, load_artifact):
        with no_deserialization(), pytest.raises(VerificationError) as excinfo:
            entry_point(art, trusted)
        err = excinfo.value
        assert err.reason == reason, f"{err.reason}: {err.message}"
        assert err.message and "\n" not in err.message and err.hint
        for fragment in fragments:
            assert fragment in err.message, err.message
    assert err is not None
    return err


class Canary:
    """Unpickling this creates ``path``: the standard ``__reduce__`` gadget, made harmless."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


# ----------------------------------------------------------------- round trip


def test_round_trip_gives_identical_tensors_and_predictions(artifact: Path, keys: Keys) -> None:
    model = make_model()
    loaded = load_artifact(artifact, [keys.owner_pub])
    original, restored = model.state_dict(), loaded.model.state_dict()
    assert list(original) == list(restored)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert not loaded.model.training
    assert loaded.manifest.class_names == tuple(CLASSES)
    assert loaded.manifest.input_spec == INPUT
    assert loaded.manifest.owner_key_fingerprint == fingerprint(keys.owner_pub)
    assert loaded.manifest.created == "2025-01-31T12:00:00Z"
    assert loaded.manifest.batchnorm_layers == tuple(name for name, _ in batchnorm_layers(model))
    assert oct(keys.owner_key_path.stat().st_mode & 0o777) == oct(0o600)


def test_saved_files_are_canonical_signed_and_digest_pinned(artifact: Path, keys: Keys) -> None:
    assert sorted(p.name for p in artifact.iterdir()) == sorted([WEIGHTS_FILE, MANIFEST_FILE, SIGNATURE_FILE])
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")], "staging left behind"
    body = (artifact / MANIFEST_FILE).read_bytes()
    assert canonical_json(json.loads(body)) == body
    keys.owner_pub.verify(base64.b64decode((artifact / SIGNATURE_FILE).read_bytes()), body)
    weights = (artifact / WEIGHTS_FILE).read_bytes()
    assert json.loads(body)["weights"] == {"sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}


def test_verify_builds_no_tensor_and_read_state_dict_matches(artifact: Path, keys: Keys) -> None:
    with no_deserialization():
        verified = verify_artifact(artifact, [keys.other_pub, keys.owner_pub])
    assert set(verified.header) == set(expected_state(ARCH))
    state = read_state_dict(verified)
    assert all(torch.equal(state[k], v) for k, v in make_model().state_dict().items())


def test_tripwires_are_live(artifact: Path, keys: Keys) -> None:
    """The tripwires sit on the paths the loader really uses, so silence from them means something."""
    with no_deserialization(), pytest.raises(AssertionError, match="before the artifact was fully verified"):
        load_artifact(artifact, [keys.owner_pub])


def test_canary_pickle_is_live(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(Canary(canary), protocol=4))
    assert canary.exists()


# --------------------------------------------------------------------- saving


def test_save_refuses_a_non_empty_out_dir_unless_overwrite(artifact: Path, keys: Keys) -> None:
    with pytest.raises(ConfigError) as excinfo:
        save(make_model(seed=1), artifact, keys.owner)
    assert excinfo.value.reason == "output-exists"
    save(make_model(seed=1), artifact, keys.owner, overwrite=True, model_version="2.0.0")
    assert load_artifact(artifact, [keys.owner_pub]).manifest.model_version == "2.0.0"
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["art"], "staging or old copy left behind"


def test_save_into_an_existing_empty_directory(tmp_path: Path, keys: Keys) -> None:
    (tmp_path / "art").mkdir()
    save(make_model(), tmp_path / "art", keys.owner)
    assert verify_artifact(tmp_path / "art", [keys.owner_pub]).manifest.model_id == "toy-objects"


def test_overwrite_never_replaces_a_directory_that_is_not_an_artifact(tmp_path: Path, keys: Keys) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError) as excinfo:
        save(make_model(), tmp_path / "home", keys.owner, overwrite=True)
    assert excinfo.value.reason == "output-not-an-artifact"
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_a_failed_save_leaves_no_directory(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_mod, "_replace_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        save(make_model(), tmp_path / "art", keys.owner)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_model_that_does_not_match_the_architecture(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(VerificationError) as excinfo:
        save(make_model(arch=ArchSpec("resnet_tiny", num_classes=5)), tmp_path / "art", keys.owner)
    assert excinfo.value.reason == "shape-mismatch"
    assert not (tmp_path / "art").exists()


# ------------------------------------------------------ signature and manifest


def test_manifest_edited_after_signing(artifact: Path, keys: Keys) -> None:
    body = (artifact / MANIFEST_FILE).read_bytes()
    (artifact / MANIFEST_FILE).write_bytes(body.replace(b'"model_version":"1.0.0"', b'"model_version":"1.0.1"'))
    assert_rejected(artifact, [keys.owner_pub], "bad-signature", MANIFEST_FILE)


def test_signed_by_an_untrusted_key(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.other)
    err = assert_rejected(artifact, [keys.owner_pub], "untrusted-key", fingerprint(keys.other_pub))
    assert "owner.pub" in err.hint and fingerprint(keys.other_pub) in err.hint


def test_signed_by_another_key_but_claiming_the_owner(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.other, edit=lambda m: m.update(owner_key_fingerprint=fingerprint(keys.owner_pub)))
    assert_rejected(artifact, [keys.owner_pub], "bad-signature")


def test_signed_by_the_owner_but_naming_another_key(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.owner, edit=lambda m: m.update(owner_key_fingerprint=fingerprint(keys.other_pub)))
    assert_rejected(artifact, [keys.owner_pub], "fingerprint-mismatch")


@pytest.mark.parametrize("name", [SIGNATURE_FILE, MANIFEST_FILE, WEIGHTS_FILE])
def test_missing_file(artifact: Path, keys: Keys, name: str) -> None:
    (artifact / name).unlink()
    assert_rejected(artifact, [keys.owner_pub], "missing-file", name)


def test_artifact_path_is_not_a_directory(tmp_path: Path, keys: Keys) -> None:
    assert_rejected(tmp_path / "nowhere", [keys.owner_pub], "missing-file")


def test_weights_that_are_not_a_regular_file(artifact: Path, keys: Keys) -> None:
    (artifact / WEIGHTS_FILE).unlink()
    (artifact / WEIGHTS_FILE).mkdir()
    assert_rejected(artifact, [keys.owner_pub], "not-a-file")


def test_no_trusted_keys(artifact: Path) -> None:
    assert_rejected(artifact, [], "no-trusted-keys")


@pytest.mark.parametrize("content", [b"not base64!", base64.b64encode(b"short"), b"A" * 2000])
def test_malformed_signature(artifact: Path, keys: Keys, content: bytes) -> None:
    (artifact / SIGNATURE_FILE).write_bytes(content)
    assert_rejected(artifact, [keys.owner_pub], "malformed-signature")


def test_manifest_too_large(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.owner, edit=lambda m: m["provenance"].update(blob="x" * (1024 * 1024)))
    assert_rejected(artifact, [keys.owner_pub], "manifest-too-large")


def test_non_canonical_manifest_bytes(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.owner, raw=lambda m: json.dumps(m, indent=2).encode())
    assert_rejected(artifact, [keys.owner_pub], "non-canonical-manifest")


def test_signed_manifest_that_is_not_json(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.owner, raw=lambda m: b"[" * 100_000)
    assert_rejected(artifact, [keys.owner_pub], "bad-manifest")


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.pop(key)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(extra=1),
        _drop("provenance"),
        lambda m: m.update(model_id=7),
        lambda m: m.update(model_id="line\nbreak"),
        lambda m: m.update(class_names=CLASSES[:5]),
        lambda m: m.update(class_names=["a", "a", "b", "c", "d", "e"]),
        lambda m: m["input_spec"].update(std=[0.0, 1.0, 1.0]),
        lambda m: m["input_spec"].update(mean=[0, 0, 0]),
        lambda m: m["input_spec"].update(color="yes"),
        lambda m: m["weights"].update(sha256="ABC"),
        lambda m: m["weights"].update(size=True),
        lambda m: m.update(created="2025-01-31 12:00:00"),
        lambda m: m.update(created="2025-02-30T12:00:00Z"),
        lambda m: m["architecture"].update(num_classes="6"),
        lambda m: m.update(format_version="1"),
        lambda m: m.update(provenance=[]),
    ],
)
def test_bad_manifest_fields(artifact: Path, keys: Keys, edit: Callable[[dict[str, Any]], None]) -> None:
    resign(artifact, keys.owner, edit=edit)
    assert_rejected(artifact, [keys.owner_pub], "bad-manifest")


def test_future_format_version(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.owner, edit=lambda m: m.update(format_version=2, new_field=True))
    assert_rejected(artifact, [keys.owner_pub], "unsupported-format-version", "format_version 2")


def test_unknown_architecture(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.owner, edit=lambda m: m["architecture"].update(name="vgg_evil"))
    assert_rejected(artifact, [keys.owner_pub], "unknown-architecture", "vgg_evil")


def test_architecture_with_bad_argument_values(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.owner, edit=lambda m: m["architecture"]["kwargs"].update(width="wide"))
    assert_rejected(artifact, [keys.owner_pub], "unknown-architecture")


def test_batchnorm_layer_list_disagrees_with_architecture(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.owner, edit=lambda m: m["batchnorm_layers"].reverse())
    assert_rejected(artifact, [keys.owner_pub], "bn-layers-mismatch")


# ------------------------------------------------------------- weights: digest


def test_one_flipped_byte_in_the_weights(artifact: Path, keys: Keys) -> None:
    blob = bytearray((artifact / WEIGHTS_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (artifact / WEIGHTS_FILE).write_bytes(bytes(blob))
    assert_rejected(artifact, [keys.owner_pub], "digest-mismatch", "sha256")


def test_truncated_weights(artifact: Path, keys: Keys) -> None:
    blob = (artifact / WEIGHTS_FILE).read_bytes()
    (artifact / WEIGHTS_FILE).write_bytes(blob[: len(blob) - 100])
    assert_rejected(artifact, [keys.owner_pub], "size-mismatch")


def test_truncated_weights_resigned_are_caught_by_the_offsets(artifact: Path, keys: Keys) -> None:
    blob = (artifact / WEIGHTS_FILE).read_bytes()
    resign(artifact, keys.owner, weights=blob[: len(blob) - 100])
    assert_rejected(artifact, [keys.owner_pub], "bad-offsets", "past the end")


def test_weights_shorter_than_the_length_prefix(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.owner, weights=b"\x10\x00\x00")
    assert_rejected(artifact, [keys.owner_pub], "truncated")


def test_weights_changed_between_verify_and_read(artifact: Path, keys: Keys) -> None:
    verified = verify_artifact(artifact, [keys.owner_pub])
    blob = bytearray((artifact / WEIGHTS_FILE).read_bytes())
    blob[-1] ^= 0xFF
    (artifact / WEIGHTS_FILE).write_bytes(bytes(blob))
    with no_deserialization(), pytest.raises(VerificationError) as excinfo:
        read_state_dict(verified)
    assert excinfo.value.reason == "weights-changed"


# ---------------------------------------------------------- weights: impostors


def test_pickle_renamed_to_safetensors_is_never_unpickled(artifact: Path, keys: Keys, tmp_path: Path) -> None:
    canary = tmp_path / "canary-pickle"
    resign(artifact, keys.owner, weights=pickle.dumps({"state": Canary(canary)}, protocol=4))
    err = assert_rejected(artifact, [keys.owner_pub], "pickle-not-safetensors", "pickle", "not unpickled")
    assert "import-weights" in err.hint
    assert not canary.exists()


def test_torch_zip_checkpoint_renamed_to_safetensors_is_never_unpickled(
    artifact: Path, keys: Keys, tmp_path: Path
) -> None:
    canary = tmp_path / "canary-torch"
    buffer = io.BytesIO()
    torch.save({"state": Canary(canary)}, buffer)
    assert buffer.getvalue()[:4] == b"PK\x03\x04"
    resign(artifact, keys.owner, weights=buffer.getvalue())
    assert_rejected(artifact, [keys.owner_pub], "pickle-not-safetensors", "zip checkpoint")
    assert not canary.exists()


LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1234567\n"
)


def test_git_lfs_pointer_instead_of_weights(artifact: Path, keys: Keys) -> None:
    (artifact / WEIGHTS_FILE).write_bytes(LFS_POINTER)  # the usual case: wrong size for the manifest
    err = assert_rejected(artifact, [keys.owner_pub], "lfs-pointer", "Git LFS pointer")
    assert "git lfs pull" in err.hint
    resign(artifact, keys.owner, weights=LFS_POINTER)  # even when the digest matches
    assert_rejected(artifact, [keys.owner_pub], "lfs-pointer")


# ------------------------------------------------------------- weights: header


@pytest.mark.parametrize("claimed", [2**63, 17 * 1024 * 1024, 4096 + 1])
def test_header_claiming_a_huge_size(artifact: Path, keys: Keys, claimed: int) -> None:
    resign(artifact, keys.owner, weights=struct.pack("<Q", claimed) + b"{" + b" " * 4095)
    assert_rejected(artifact, [keys.owner_pub], "header-too-large", str(claimed))


@pytest.mark.parametrize("header", [b"{not json}", b"[1, 2]  ", b'{"a": 1, "a": 2}', b"{\xff}", b" {}"])
def test_header_that_is_not_a_json_object(artifact: Path, keys: Keys, header: bytes) -> None:
    resign(artifact, keys.owner, weights=struct.pack("<Q", len(header)) + header)
    assert_rejected(artifact, [keys.owner_pub], "bad-header")


def test_header_entry_with_wrong_structure(artifact: Path, keys: Keys) -> None:
    header, data = split_safetensors((artifact / WEIGHTS_FILE).read_bytes())
    header["backbone.conv1.weight"]["shape"] = [8, 3, 3, -3]
    resign(artifact, keys.owner, weights=join_safetensors(header, data))
    assert_rejected(artifact, [keys.owner_pub], "bad-header", "backbone.conv1.weight")


@pytest.mark.parametrize("metadata", [{"a": 1}, ["x"], {"nested": {"a": "b"}}, {"lone": "\ud800"}])
def test_metadata_must_map_strings_to_strings(artifact: Path, keys: Keys, metadata: Any) -> None:
    header, data = split_safetensors((artifact / WEIGHTS_FILE).read_bytes())
    header["__metadata__"] = metadata
    resign(artifact, keys.owner, weights=join_safetensors(header, data))
    assert_rejected(artifact, [keys.owner_pub], "bad-metadata")


def test_string_metadata_is_allowed(artifact: Path, keys: Keys) -> None:
    header, data = split_safetensors((artifact / WEIGHTS_FILE).read_bytes())
    header["__metadata__"] = {"format": "pt"}
    resign(artifact, keys.owner, weights=join_safetensors(header, data))
    assert load_artifact(artifact, [keys.owner_pub]).manifest.model_id == "toy-objects"


def test_wrong_dtype(artifact: Path, keys: Keys) -> None:
    def to_double(state: dict[str, torch.Tensor]) -> None:
        state["bottleneck.fc.weight"] = state["bottleneck.fc.weight"].double()

    resign(artifact, keys.owner, weights=state_bytes(to_double))
    assert_rejected(artifact, [keys.owner_pub], "dtype-mismatch", "bottleneck.fc.weight", "F64", "F32")


def test_unknown_dtype(artifact: Path, keys: Keys) -> None:
    header, data = split_safetensors((artifact / WEIGHTS_FILE).read_bytes())
    header["backbone.bn1.num_batches_tracked"]["dtype"] = "C64"
    resign(artifact, keys.owner, weights=join_safetensors(header, data))
    assert_rejected(artifact, [keys.owner_pub], "dtype-mismatch", "unknown dtype")


def test_shape_disagrees_with_the_architecture(artifact: Path, keys: Keys) -> None:
    def reshape(state: dict[str, torch.Tensor]) -> None:
        state["classifier.weight_v"] = torch.zeros(6, 128)

    resign(artifact, keys.owner, weights=state_bytes(reshape))
    assert_rejected(artifact, [keys.owner_pub], "shape-mismatch", "classifier.weight_v", "[6, 128]", "[6, 256]")


def test_missing_tensors(artifact: Path, keys: Keys) -> None:
    def drop(state: dict[str, torch.Tensor]) -> None:
        del state["classifier.bias"], state["backbone.bn1.running_var"]

    resign(artifact, keys.owner, weights=state_bytes(drop))
    assert_rejected(artifact, [keys.owner_pub], "missing-tensors", "'backbone.bn1.running_var', 'classifier.bias'")


def test_unexpected_tensors(artifact: Path, keys: Keys) -> None:
    def add(state: dict[str, torch.Tensor]) -> None:
        state["fc.weight"] = torch.zeros(6, 64)

    resign(artifact, keys.owner, weights=state_bytes(add))
    assert_rejected(artifact, [keys.owner_pub], "unexpected-tensors", "fc.weight")


def test_overlapping_offsets(artifact: Path, keys: Keys) -> None:
    header, data = split_safetensors((artifact / WEIGHTS_FILE).read_bytes())
    header["backbone.bn1.bias"]["data_offsets"] = header["backbone.bn1.weight"]["data_offsets"]
    resign(artifact, keys.owner, weights=join_safetensors(header, data))
    assert_rejected(artifact, [keys.owner_pub], "bad-offsets")


def test_trailing_bytes_after_the_tensors(artifact: Path, keys: Keys) -> None:
    resign(artifact, keys.owner, weights=(artifact / WEIGHTS_FILE).read_bytes() + b"\0" * 16)
    assert_rejected(artifact, [keys.owner_pub], "bad-offsets", "cover")


def test_offsets_that_disagree_with_the_shape(artifact: Path, keys: Keys) -> None:
    header, data = split_safetensors((artifact / WEIGHTS_FILE).read_bytes())
    header["backbone.conv1.weight"]["shape"] = [8, 3, 3, 2]
    resign(artifact, keys.owner, weights=join_safetensors(header, data))
    assert_rejected(artifact, [keys.owner_pub], "bad-offsets", "backbone.conv1.weight")


# ---------------------------------------------------------------- properties


@pytest.fixture
def valid_weights(artifact: Path) -> bytes:
    """The pristine weights, read once before hypothesis starts rewriting the artifact."""
    return (artifact / WEIGHTS_FILE).read_bytes()


def _check_weights(art: Path, keys: Keys, blob: bytes) -> None:
    """Re-signed ``blob`` is refused with a VerificationError or, if accepted, loads exactly as verified."""
    resign(art, keys.owner, weights=blob)
    try:
        with no_deserialization():
            verified = verify_artifact(art, [keys.owner_pub])
    except VerificationError as err:
        assert err.reason and "\n" not in err.message and len(err.message) < 2000
        return
    state = read_state_dict(verified)  # what the hand parser accepts, safetensors must read identically
    assert {name: (tuple(t.shape), str(t.dtype)) for name, t in state.items()} == {
        name: (shape, str(dtype)) for name, (shape, dtype) in expected_state(ARCH).items()
    }


_HYPOTHESIS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_json_leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
_json = st.recursive(_json_leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c))


@_HYPOTHESIS
@given(
    blob=st.one_of(
        st.binary(max_size=4096),
        st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=512)),
        st.builds(lambda h, rest: join_safetensors(h, rest), st.dictionaries(st.text(max_size=30), _json), st.binary()),
    )
)
def test_random_weight_files_only_raise_verification_errors(artifact: Path, keys: Keys, blob: bytes) -> None:
    _check_weights(artifact, keys, blob)


@_HYPOTHESIS
@given(
    edits=st.lists(st.tuples(st.integers(0, 12_000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 12_000)),
)
def test_mutated_weight_files_only_raise_verification_errors(
    artifact: Path, keys: Keys, valid_weights: bytes, edits: list[tuple[int, int]], cut: int | None
) -> None:
    blob = bytearray(valid_weights)
    for position, value in edits:
        blob[position % len(blob)] = value
    _check_weights(artifact, keys, bytes(blob[:cut] if cut is not None else blob))
