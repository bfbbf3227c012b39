"""A corpus of malformed artifacts, generated here (no committed blobs), each refused before any tensor.

What is proven:

* every row of :data:`CORPUS` (a named way an artifact can be broken or forged) is refused
  by ``load_artifact`` with a :class:`VerificationError` whose ``reason`` names that kind of
  problem and whose one-line message names it in words;
* no two rows share a message, so a user can tell every problem apart;
* nothing is deserialised, no tensor is built from the file, and no model is constructed
  before the refusal (``tensor_spy`` plus a counter on ``build_model``);
* truncating any of the three files at many cut points, and flipping bits all over them,
  is refused with the reason the cut or flip position predicts (also when the truncated
  weights are re-signed, so the header checks, not the digest, must catch them);
* a pickle whose ``__reduce__`` would create a file is refused and never runs, although
  the same pickle does create the file when unpickled on purpose at the end.

``tests/unit/test_artifact.py`` tests many of these cases one by one with their hints; this
module is the complete table and the sweeps.  Each artifact starts from one real
``save_artifact`` output (``fuzz_artifacts.make_pristine``) and is changed in memory,
re-signed with the owner's key where the row needs the checks behind the signature.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from xkt.shared import artifact as artifact_mod
from xkt.shared.artifact import load_artifact
from xkt.shared.errors import VerificationError
from xkt.shared.signing import canonical_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_artifacts import (  # noqa: E402
    Artifact,
    Pristine,
    join_safetensors,
    make_pristine,
    signature_file,
    split_safetensors,
    tensor_spy,
)

LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1234567\n"
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    return make_pristine(tmp_path_factory.mktemp("corpus") / "model")


class Canary:
    """Unpickling this creates ``path``: the standard ``__reduce__`` gadget, made harmless."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


# ------------------------------------------------------------------ judging one artifact


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


def refusal(artifact: Artifact, folder: Path, p: Pristine) -> Refusal:
    """Load ``artifact`` from ``folder``; it must be refused before anything is deserialised or built."""
    built: list[object] = []
    artifact.write(folder)
    with tensor_spy(p.owner_pub, folder) as spy, pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifact_mod, "build_model", lambda *args, **kwargs: built.append(args))
        with pytest.raises(VerificationError) as info:
            load_artifact(folder, [p.owner_pub])
    assert spy.deserialised == spy.frombuffer_calls == 0 and not built, "refused only after building tensors"
    assert spy.violations == []
    err = info.value
    assert err.reason and err.hint and err.message and "\n" not in err.message
    return Refusal(err.reason, err.message)


# ------------------------------------------------------------------ ways to break an artifact


def _files(p: Pristine) -> tuple[bytes, bytes, bytes]:
    assert p.files.manifest is not None and p.files.signature is not None and p.files.weights is not None
    return p.files.manifest, p.files.signature, p.files.weights


def _edited_manifest(edit: Callable[[dict[str, Any]], None]) -> Callable[[Pristine], Artifact]:
    """Edit the manifest JSON (after the weights digest is filled in), then sign it with the owner key."""

    def build(p: Pristine) -> Artifact:
        data = p.manifest_json
        edit(data)
        raw = canonical_json(data)
        return Artifact(raw, signature_file(p.owner, raw), p.files.weights)

    return build


def _edited_header(edit: Callable[[dict[str, Any], bytes], tuple[Any, bytes]]) -> Callable[[Pristine], Artifact]:
    """Rewrite the safetensors header (and data) of the weights, then re-sign them."""

    def build(p: Pristine) -> Artifact:
        header, data = split_safetensors(_files(p)[2])
        new_header, new_data = edit(header, data)
        return p.resigned(weights=join_safetensors(new_header, new_data))

    return build


def _state_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Pristine], Artifact]:
    """Weights saved by safetensors itself from a changed state dict (valid files, wrong content), re-signed."""

    def build(p: Pristine) -> Artifact:
        state = {name: tensor.clone() for name, tensor in safetensors.torch.load(_files(p)[2]).items()}
        change(state)
        return p.resigned(weights=safetensors.torch.save(state))

    return build


def _set(path: str, value: Any) -> Callable[[dict[str, Any], bytes], tuple[Any, bytes]]:
    """Set ``header[tensor][field]`` for ``path`` = ``"tensor/field"``."""
    tensor, key = path.split("/")

    def edit(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        header[tensor][key] = value
        return header, data

    return edit


def _prefix(length: int, body: bytes = b"{}") -> Callable[[Pristine], Artifact]:
    """Signed weights with a chosen 8-byte header length (``length`` modulo 2**64) before ``body``."""
    return lambda p: p.resigned(weights=struct.pack("<Q", length % 2**64) + body)


def _torch_zip(p: Pristine) -> Artifact:
    buffer = io.BytesIO()
    torch.save({"state": torch.zeros(2)}, buffer)
    return p.resigned(weights=buffer.getvalue())


def _without(index: int) -> Callable[[Pristine], Artifact]:
    def build(p: Pristine) -> Artifact:
        files: list[bytes | None] = list(_files(p))
        files[index] = None
        return Artifact(*files)

    return build


def _update(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value

    return edit


@dataclass(frozen=True)
class Case:
    """One way to break an artifact, the reason it must be refused with, and words its message must use."""

    name: str
    build: Callable[[Pristine], Artifact]
    reason: str
    words: tuple[str, ...]
    same_problem_as: str | None = None  # the same problem reached by another code path: the same message


CORPUS = [
    # ---- the files and the signature
    Case("no manifest", _without(0), "missing-file", ("has no manifest.json",)),
    Case("no signature", _without(1), "missing-file", ("has no manifest.sig",)),
    Case("no weights", _without(2), "missing-file", ("has no weights.safetensors",)),
    Case(
        "manifest edited after signing",
        lambda p: Artifact(_files(p)[0].replace(b'"model_version":"1"', b'"model_version":"2"'), *_files(p)[1:]),
        "bad-signature",
        ("does not verify",),
    ),
    Case(
        "signature by another key",
        lambda p: p.resigned(key=p.other),
        "untrusted-key",
        ("is signed by owner key ed25519:", "which is not a trusted key"),
    ),
    Case(
        "signature is not base64",
        lambda p: Artifact(_files(p)[0], b"not*base64!", _files(p)[2]),
        "malformed-signature",
        ("not the base64 of a 64-byte",),
    ),
    Case(
        "signature is 63 bytes",
        lambda p: Artifact(_files(p)[0], base64.b64encode(b"\0" * 63), _files(p)[2]),
        "malformed-signature",
        ("64-byte Ed25519 signature",),
        same_problem_as="signature is not base64",
    ),
    # ---- the signed manifest
    Case(
        "manifest is not canonical JSON",
        lambda p: p.resigned(raw_manifest=json.dumps(p.manifest_json, indent=1).encode()),
        "non-canonical-manifest",
        ("not in canonical JSON form",),
    ),
    Case(
        "manifest is not JSON",
        lambda p: p.resigned(raw_manifest=b'{"format_version":'),
        "bad-manifest",
        ("not valid JSON",),
    ),
    Case(
        "manifest is not UTF-8",
        lambda p: p.resigned(raw_manifest=b'{"model_id":"\xff"}'),
        "bad-manifest",
        ("not valid JSON", "utf-8"),
    ),
    Case(
        "manifest names another owner key",
        _edited_manifest(lambda m: m.update(owner_key_fingerprint="ed25519:" + "0" * 64)),
        "fingerprint-mismatch",
        ("names owner key ed25519:000",),
    ),
    Case(
        "manifest from a future format",
        _edited_manifest(lambda m: m.update(format_version=2)),
        "unsupported-format-version",
        ("format_version 2",),
    ),
    Case(
        "manifest with an unknown key",
        _edited_manifest(lambda m: m.update(surprise=True)),
        "bad-manifest",
        ("unknown keys ['surprise']",),
    ),
    Case(
        "manifest with a negative weights size",
        _edited_manifest(_update(("weights", "size"), -1)),
        "bad-manifest",
        ("weights.size must be an integer >= 0",),
    ),
    Case(
        "architecture nobody can build",
        _edited_manifest(_update(("architecture", "name"), "vgg_evil")),
        "unknown-architecture",
        ("vgg_evil",),
    ),
    Case(
        "batch-norm layers of another architecture",
        _edited_manifest(lambda m: m["batchnorm_layers"].pop()),
        "bn-layers-mismatch",
        ("batchnorm_layers (12 names)",),
    ),
    Case(
        "manifest over the 1 MiB limit",
        lambda p: p.resigned(raw_manifest=b" " * (1024 * 1024 + 1)),
        "manifest-too-large",
        ("larger than 1048576 bytes",),
    ),
    # ---- the weights against the signed size and digest
    Case(
        "weights whose digest the manifest does not name",
        _edited_manifest(_update(("weights", "sha256"), "0" * 64)),
        "digest-mismatch",
        ("differs from the signed manifest's 0000",),
    ),
    Case(
        "weights truncated after signing",
        lambda p: Artifact(*_files(p)[:2], _files(p)[2][:-100]),
        "size-mismatch",
        ("the signed manifest says",),
    ),
    Case(
        "a Git LFS pointer in place of the weights",
        lambda p: Artifact(*_files(p)[:2], LFS_POINTER),
        "lfs-pointer",
        ("Git LFS pointer",),
    ),
    Case(
        "a Git LFS pointer, signed",
        lambda p: p.resigned(weights=LFS_POINTER + b"\n"),
        "lfs-pointer",
        ("Git LFS pointer file, not the weights",),
        same_problem_as="a Git LFS pointer in place of the weights",
    ),
    Case(
        "a pickle disguised as safetensors",
        lambda p: p.resigned(weights=pickle.dumps({"state": [1.0]}, protocol=4)),
        "pickle-not-safetensors",
        ("a Python pickle", "not unpickled"),
    ),
    Case("a torch zip checkpoint", _torch_zip, "pickle-not-safetensors", ("PyTorch zip checkpoint",)),
    # ---- the safetensors header (the weights re-signed, so only these checks can catch it)
    Case(
        "weights shorter than the length prefix",
        lambda p: p.resigned(weights=b"\x10\0\0"),
        "truncated",
        ("only 3 bytes",),
    ),
    Case("header length beyond the file", _prefix(4096, b"{}"), "header-too-large", ("the 2 bytes that follow it",)),
    Case(
        "header length over the 16 MiB cap", _prefix(17 * 2**20, b"{" + b" " * 64), "header-too-large", ("16 MiB cap",)
    ),
    Case("negative header length (-1 as int64)", _prefix(-1), "header-too-large", ("18446744073709551615",)),
    Case("negative header length (-2**63)", _prefix(-(2**63)), "header-too-large", ("9223372036854775808",)),
    Case("header is not JSON", _prefix(5, b"{nope"), "bad-header", ("not valid JSON",)),
    Case("header is a JSON list", _prefix(6, b"[1, 2]"), "bad-header", ("does not start with '{'",)),
    Case("header with duplicate keys", _prefix(16, b'{"a": 1, "a": 2}'), "bad-header", ("duplicate key",)),
    Case(
        "metadata that is not text",
        _edited_header(lambda h, d: ({**h, "__metadata__": {"format": 1}}, d)),
        "bad-metadata",
        ("__metadata__ is not an object of strings",),
    ),
    Case(
        "an entry with a negative dimension",
        _edited_header(_set("backbone.conv1.weight/shape", [8, 3, 3, -3])),
        "bad-header",
        ("shape must be a list of non-negative integers",),
    ),
    Case(
        "an entry with three offsets",
        _edited_header(_set("backbone.conv1.weight/data_offsets", [0, 1, 2])),
        "bad-header",
        ("data_offsets must be two non-negative integers",),
    ),
    Case(
        "an entry without a dtype",
        _edited_header(lambda h, d: ({**h, "classifier.bias": {"shape": [3], "data_offsets": [0, 12]}}, d)),
        "bad-header",
        ("must have exactly dtype, shape and data_offsets",),
    ),
    Case(
        "a dtype that is a list (regression: crashed with TypeError)",
        _edited_header(_set("classifier.bias/dtype", ["F32"])),
        "dtype-mismatch",
        ("unknown dtype ['F32']",),
    ),
    Case(
        "an unknown dtype",
        _edited_header(_set("classifier.bias/dtype", "C64")),
        "dtype-mismatch",
        ("unknown dtype 'C64'",),
    ),
    Case(
        "a float64 tensor where float32 belongs",
        _state_weights(lambda s: s.update({"classifier.bias": s["classifier.bias"].double()})),
        "dtype-mismatch",
        ("'classifier.bias' is F64, expected F32",),
    ),
    Case(
        "offsets that overlap",
        _edited_header(_set("backbone.bn1.bias/data_offsets", [0, 32])),  # on top of the first tensor
        "bad-offsets",
        ("overlaps or leaves a gap",),
    ),
    Case(
        "tensor data cut short (re-signed)",
        lambda p: p.resigned(weights=_files(p)[2][:-4]),
        "bad-offsets",
        ("runs past the end of the data",),
    ),
    Case(
        "bytes after the last tensor",
        lambda p: p.resigned(weights=_files(p)[2] + b"\0" * 4),
        "bad-offsets",
        ("tensors cover 386144 of the 386148 data bytes",),
    ),
    Case(
        "a shape that disagrees with its offsets",
        _edited_header(_set("classifier.bias/shape", [4])),
        "bad-offsets",
        ("'classifier.bias' spans 12 bytes, not what its shape needs",),
    ),
    Case(
        "a missing tensor",
        _state_weights(lambda s: s.pop("classifier.bias")),
        "missing-tensors",
        ("lacks 1 tensor(s) the architecture has: 'classifier.bias'",),
    ),
    Case(
        "an extra tensor",
        _state_weights(lambda s: s.update({"backdoor.weight": torch.zeros(2)})),
        "unexpected-tensors",
        ("has 1 tensor(s) the architecture lacks: 'backdoor.weight'",),
    ),
    Case(
        "a tensor of the wrong shape",
        _state_weights(lambda s: s.update({"classifier.weight_v": torch.zeros(3, 128)})),
        "shape-mismatch",
        ("'classifier.weight_v' has shape [3, 128], but the architecture expects [3, 256]",),
    ),
]


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_each_malformed_artifact_is_refused_before_any_tensor(pristine: Pristine, tmp_path: Path, case: Case) -> None:
    got = refusal(case.build(pristine), tmp_path / "artifact", pristine)
    assert got.reason == case.reason, got.message
    for words in case.words:
        assert words in got.message, got.message


def test_every_problem_has_its_own_message(pristine: Pristine, tmp_path: Path) -> None:
    """Distinct problems never share a message; one problem reached two ways gets the same one."""
    messages = {case.name: refusal(case.build(pristine), tmp_path / "artifact", pristine).message for case in CORPUS}
    problems = [messages[case.name] for case in CORPUS if case.same_problem_as is None]
    shared = {message for message in problems if problems.count(message) > 1}
    assert not shared, f"problems a user could not tell apart: {shared}"
    for case in CORPUS:
        if case.same_problem_as is not None:
            assert messages[case.name] == messages[case.same_problem_as]
    assert len({case.reason for case in CORPUS}) >= 20  # the corpus spans the verifier's vocabulary


# ------------------------------------------------------------------ sweeps: cut points and bit flips


def cut_points(size: int, count: int = 40) -> list[int]:
    """``count`` cuts spread over [0, size), plus the edges where a format changes meaning."""
    return sorted({0, 1, 7, 8, 9, size - 1, *range(0, size, max(1, size // count))} & set(range(size)))


@pytest.mark.parametrize(("index", "reason"), [(0, "bad-signature"), (1, "malformed-signature"), (2, "size-mismatch")])
def test_truncated_files_at_many_cut_points(pristine: Pristine, tmp_path: Path, index: int, reason: str) -> None:
    """Cut one file short, not re-signed: the signature or the signed size catches every cut."""
    original = _files(pristine)
    for cut in cut_points(len(original[index].rstrip() if index == 1 else original[index])):  # sig: "\n" is optional
        files: list[bytes | None] = list(original)
        files[index] = original[index][:cut]
        assert refusal(Artifact(*files), tmp_path / "artifact", pristine).reason == reason, cut


def test_truncated_signed_manifests_are_not_json(pristine: Pristine, tmp_path: Path) -> None:
    manifest = _files(pristine)[0]
    for cut in cut_points(len(manifest)):
        assert (
            refusal(pristine.resigned(raw_manifest=manifest[:cut]), tmp_path / "a", pristine).reason == "bad-manifest"
        )


def test_truncated_signed_weights_are_caught_by_the_header_checks(pristine: Pristine, tmp_path: Path) -> None:
    """Re-signed, so the digest passes: the cut position says which header check must refuse it."""
    weights = _files(pristine)[2]
    header_end = 8 + int.from_bytes(weights[:8], "little")
    cuts = cut_points(len(weights)) + cut_points(header_end) + [header_end, header_end + 1]
    for cut in sorted(set(cuts)):
        if cut < 8:
            want = "truncated"
        elif cut < header_end:
            want = "header-too-large"  # the length prefix promises more than the file holds
        else:
            want = "bad-offsets"  # the header is whole, the tensor data is not
        assert refusal(pristine.resigned(weights=weights[:cut]), tmp_path / "a", pristine).reason == want, cut


def bit_positions(size: int, count: int = 64) -> Iterator[int]:
    """``count`` bit positions spread over ``size`` bytes, each in a different byte and bit."""
    for step in range(count):
        byte = (step * size) // count
        yield byte * 8 + step % 8


@pytest.mark.parametrize(
    ("index", "reasons"),
    [
        (0, {"bad-signature", "untrusted-key"}),  # untrusted-key: the flip changed the claimed fingerprint
        (1, {"bad-signature", "malformed-signature"}),  # malformed: the flip left the base64 alphabet
        (2, {"digest-mismatch"}),
    ],
)
def test_bit_flips_anywhere_are_refused(pristine: Pristine, tmp_path: Path, index: int, reasons: set[str]) -> None:
    original = _files(pristine)
    seen = set()
    for bit in bit_positions(len(original[index])):
        flipped = bytearray(original[index])
        flipped[bit // 8] ^= 1 << (bit % 8)
        files: list[bytes | None] = list(original)
        files[index] = bytes(flipped)
        got = refusal(Artifact(*files), tmp_path / "artifact", pristine)
        assert got.reason in reasons, (bit, got.message)
        seen.add(got.reason)
    assert seen, "no flip was tried"


# ------------------------------------------------------------------ the pickle canary


def test_a_pickle_canary_never_runs_but_is_live(pristine: Pristine, tmp_path: Path) -> None:
    """The disguised pickle would create a file if anything unpickled it; the loader never does."""
    canary = tmp_path / "canary-was-here"
    gadget = pickle.dumps({"state": Canary(canary)}, protocol=4)
    signed, unsigned = pristine.resigned(weights=gadget), Artifact(*_files(pristine)[:2], gadget)
    for artifact, reason in ((signed, "pickle-not-safetensors"), (unsigned, "size-mismatch")):
        assert refusal(artifact, tmp_path / "artifact", pristine).reason == reason
        assert not canary.exists(), "the loader ran the pickle"
    pickle.loads(gadget)  # controlled: proves the gadget is real, so its silence above means something
    assert canary.exists()
