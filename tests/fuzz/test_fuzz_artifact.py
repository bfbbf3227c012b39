"""Fuzzing the artifact verifier and loader: typed errors only, no hang, no tensor from unverified bytes.

What is proven, for random and mutated manifests, signatures and weights files:

* ``load_artifact`` (signature → manifest → digest → safetensors header → tensors) either
  accepts or raises a :class:`VerificationError` with a ``reason``, a one-line message and
  a hint: never another exception;
* no input takes more than :data:`SLOW_INPUT_S` (a hang), and each test has a time bound;
* no tensor is ever built from bytes the trusted owner did not sign (``tensor_spy`` checks
  the signature and digest itself, independently of the product), and nothing is ever
  unpickled or read through an unchecked safetensors entry point;
* the hand-written safetensors header check agrees with the safetensors library: whatever
  it accepts, safetensors loads into exactly the architecture's names, dtypes and shapes;
* the parts run alone, at higher speed: the manifest verifier (signature + strict canonical
  parse + architecture) and the client's batch-norm statistics parser (``shared/serde.py``).

How: hypothesis rewrites one pristine artifact (``fuzz_artifacts``) at the byte level and at
the JSON level, and re-signs it with the owner's key for most inputs, so the checks behind
the signature and the digest see hostile data too.  ``XKT_FUZZ_EXAMPLES`` sets the size.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

from xkt.protos import source_model_pb2 as pb
from xkt.shared.artifact import check_signature, load_artifact
from xkt.shared.errors import VerificationError
from xkt.shared.manifest import check_batchnorm_layers, parse_signed_manifest
from xkt.shared.models import expected_state
from xkt.shared.safetensors_check import check_header, expected_for
from xkt.shared.serde import batchnorm_stats_from_proto

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_artifacts import (  # noqa: E402
    ARCH,
    Artifact,
    Pristine,
    join_safetensors,
    make_pristine,
    signature_file,
    split_safetensors,
    tensor_spy,
)
from fuzz_support import FUZZ, tally, time_bound_s  # noqa: E402

SLOW_INPUT_S = 5.0
EXPECTED = expected_for(ARCH)

pytestmark = pytest.mark.timeout(time_bound_s())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    return make_pristine(tmp_path_factory.mktemp("fuzz-artifact") / "model")


# ------------------------------------------------------------------ one input, judged


def attempt(target: str, action: Callable[[], object]) -> bool:
    """Run ``action`` on one input: True if it was accepted, False if refused properly; else fail."""
    start = time.perf_counter()
    error: VerificationError | None = None
    try:
        action()
    except VerificationError as err:
        error = err
    except Exception as exc:  # the crash the fuzzer looks for: recorded, then re-raised
        tally(target).record(type(exc).__name__, time.perf_counter() - start, crash=True)
        raise
    seconds = time.perf_counter() - start
    malformed = error is not None and not (error.reason and error.hint and _one_line(error.message))
    tally(target).record(error.reason if error else "accepted", seconds, crash=malformed, hang=seconds > SLOW_INPUT_S)
    assert seconds <= SLOW_INPUT_S, f"{target}: one input took {seconds:.1f} s"
    assert not malformed, f"{target}: a refusal without reason, hint or a one-line message: {error!r}"
    return error is None


def _one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and len(message) < 2000


# ------------------------------------------------------------------ mutations

_json_leaves = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)  # lone surrogates too
)
json_values = st.recursive(
    _json_leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
)
"""Any JSON value, and some that only look like one: NaN, infinities, huge integers, lone surrogates."""


def mutate_bytes(data: bytes, draw: Callable[..., Any]) -> bytes:
    """One byte-level mutation of ``data``: flipped bits, a cut, an insertion, an overwrite, ..."""
    size = max(len(data), 1)
    position = draw(st.one_of(st.integers(0, min(size, 4096) - 1), st.integers(0, size - 1)))  # the header often
    op = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "overwrite", "duplicate", "random", "empty"]))
    if op == "flip":
        out = bytearray(data or b"\0")
        for bit in draw(st.lists(st.integers(0, 7), min_size=1, max_size=4)):
            out[position % len(out)] ^= 1 << bit
            position = position * 31 + 7
        return bytes(out)
    if op == "truncate":
        return data[:position]
    if op == "insert":
        return data[:position] + draw(st.binary(min_size=1, max_size=64)) + data[position:]
    if op == "overwrite":
        patch = draw(st.binary(min_size=1, max_size=64))
        return data[:position] + patch + data[position + len(patch) :]
    if op == "duplicate":
        return data[:position] + data[position : position + 4096] + data[position:]
    return b"" if op == "empty" else draw(st.binary(max_size=4096))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON document (dict keys and list indexes), the root's children first."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    found: list[tuple[Any, ...]] = []
    for key, child in items:
        found.append((*prefix, key))
        found.extend(_paths(child, (*prefix, key)))
    return found


def edit_json(document: Any, draw: Callable[..., Any]) -> Any:
    """1 to 3 edits of a JSON document: set a value anywhere, delete one, or add a key."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(document)
        if not paths:
            return draw(json_values)
        path = draw(st.sampled_from(paths))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if op == "set":
            parent[path[-1]] = draw(json_values)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return document


def encode_json(document: Any, draw: Callable[..., Any]) -> bytes:
    """``document`` as bytes: usually canonical, sometimes pretty, ASCII-escaped or unsorted."""
    style = draw(st.sampled_from(["canonical", "canonical", "canonical", "pretty", "ascii", "unsorted"]))
    text = json.dumps(
        document,
        sort_keys=style != "unsorted",
        separators=(", ", ": ") if style == "pretty" else (",", ":"),
        ensure_ascii=style == "ascii",
        allow_nan=True,
    )
    return text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8


def _impostor(draw: Callable[..., Any]) -> bytes:
    """Files mistaken for safetensors: a pickle, a torch zip checkpoint, a Git LFS pointer."""
    kind = draw(st.sampled_from(["pickle", "torch-zip", "lfs"]))
    if kind == "pickle":
        return pickle.dumps({"weights": [1.0, 2.0]}, protocol=draw(st.integers(2, 5)))
    if kind == "torch-zip":
        buffer = io.BytesIO()
        torch.save({"weights": torch.zeros(2)}, buffer)
        return buffer.getvalue()
    return b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 1\n"


def draw_artifact(p: Pristine, draw: Callable[..., Any]) -> Artifact:
    """A hostile variant of the pristine artifact (most of them re-signed by the trusted owner)."""
    files = p.files
    assert files.manifest is not None and files.signature is not None and files.weights is not None
    kind = draw(
        st.sampled_from(
            ["file bytes", "signed manifest bytes", "signed manifest JSON", "signed weights bytes"]
            + ["signed header JSON", "signature", "missing file", "impostor weights"]
        ),
        label="kind",
    )
    if kind == "file bytes":  # not re-signed: the signature or the digest must catch it
        index = draw(st.integers(0, 2))
        changed = [files.manifest, files.signature, files.weights]
        changed[index] = mutate_bytes(changed[index], draw)
        return Artifact(*changed)
    if kind == "signed manifest bytes":
        return p.resigned(raw_manifest=mutate_bytes(files.manifest, draw))
    if kind == "signed manifest JSON":
        return p.resigned(raw_manifest=encode_json(edit_json(p.manifest_json, draw), draw))
    if kind == "signed weights bytes":
        return p.resigned(weights=mutate_bytes(files.weights, draw))
    if kind == "signed header JSON":
        header, data = split_safetensors(files.weights)
        length = draw(st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)))
        return p.resigned(weights=join_safetensors(edit_json(header, draw), data, length=length))
    if kind == "signature":
        other_manifest = encode_json(edit_json(p.manifest_json, draw), draw)
        signature = draw(
            st.sampled_from(
                [
                    signature_file(p.other, files.manifest),  # another key
                    signature_file(p.owner, other_manifest),  # the owner, over other bytes
                ]
            )
            | st.binary(max_size=200)
            | st.binary(min_size=64, max_size=64).map(base64.b64encode)  # well-formed, wrong
        )
        return Artifact(files.manifest, signature, files.weights)
    if kind == "missing file":
        present = [files.manifest, files.signature, files.weights]
        present[draw(st.integers(0, 2))] = None
        return Artifact(*present)
    blob = _impostor(draw)
    return p.resigned(weights=blob) if draw(st.booleans()) else Artifact(files.manifest, files.signature, blob)


# ------------------------------------------------------------------ the artifact loader, end to end


@FUZZ
@given(data=st.data())
def test_artifact_loader(pristine: Pristine, tmp_path: Path, data: st.DataObject) -> None:
    folder = draw_artifact(pristine, data.draw).write(tmp_path / "artifact")
    with tensor_spy(pristine.owner_pub, folder) as spy:
        accepted = attempt("artifact loader", lambda: load_artifact(folder, [pristine.owner_pub]))
    assert spy.violations == []
    assert accepted == (spy.deserialised == 1), "an accepted artifact is deserialised exactly once, a refused one never"


def test_the_loader_fuzzer_reaches_acceptance(pristine: Pristine, tmp_path: Path) -> None:
    """The oracle is live: the pristine artifact is accepted and deserialised under the spy."""
    folder = pristine.files.write(tmp_path / "artifact")
    with tensor_spy(pristine.owner_pub, folder) as spy:
        assert attempt("artifact loader (pristine)", lambda: load_artifact(folder, [pristine.owner_pub]))
    assert spy.deserialised == 1 and spy.frombuffer_calls > 0 and spy.violations == []


def test_the_spy_catches_a_tensor_from_unsigned_bytes(pristine: Pristine, tmp_path: Path) -> None:
    """The oracle is live: deserialising bytes the signed manifest does not name is a violation."""
    folder = pristine.files.write(tmp_path / "artifact")
    with tensor_spy(pristine.owner_pub, folder) as spy:
        safetensors.torch.load(safetensors.torch.save({"x": torch.zeros(2)}))
    assert spy.violations == ["deserialised bytes whose sha256 the signed manifest does not name"]


# ------------------------------------------------------------------ the parts, in memory


def verify_manifest(p: Pristine, manifest: bytes, signature: bytes) -> None:
    """``verify_artifact``'s steps before the weights: signature, strict parse, architecture, BN layers."""
    signer = check_signature(manifest, signature, [p.owner_pub])
    parsed = parse_signed_manifest(manifest, signer)
    check_batchnorm_layers(parsed, expected_for(parsed.arch))


@FUZZ
@given(data=st.data())
def test_manifest_verifier(pristine: Pristine, data: st.DataObject) -> None:
    assert pristine.files.manifest is not None
    source = data.draw(st.sampled_from(["JSON edit", "JSON edit", "bytes", "random JSON"]), "source")
    if source == "JSON edit":
        manifest = encode_json(edit_json(pristine.manifest_json, data.draw), data.draw)
    elif source == "bytes":
        manifest = mutate_bytes(pristine.files.manifest, data.draw)
    else:
        manifest = encode_json(data.draw(json_values), data.draw)
    key = data.draw(st.sampled_from([pristine.owner, pristine.owner, pristine.other]), "signer")
    attempt("manifest verifier", lambda: verify_manifest(pristine, manifest, key.sign(manifest)))


@FUZZ
@given(data=st.data())
def test_safetensors_header_check_agrees_with_safetensors(pristine: Pristine, data: st.DataObject) -> None:
    assert pristine.files.weights is not None
    header, tensors = split_safetensors(pristine.files.weights)
    source = data.draw(st.sampled_from(["bytes", "header JSON", "random header", "random"]), "source")
    if source == "bytes":
        blob = mutate_bytes(pristine.files.weights, data.draw)
    elif source == "header JSON":
        length = data.draw(st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)), "length")
        blob = join_safetensors(edit_json(header, data.draw), tensors, length=length)
    elif source == "random header":
        blob = join_safetensors(data.draw(json_values), data.draw(st.binary(max_size=256)))
    else:
        blob = data.draw(st.binary(max_size=4096))
    if attempt("safetensors header check", lambda: check_header(blob, len(blob), EXPECTED)):
        loaded = safetensors.torch.load(blob)  # what the hand parser accepts, the library must read the same way
        assert {name: (tuple(t.shape), t.dtype) for name, t in loaded.items()} == expected_state(ARCH)


_floats32 = st.floats(width=32)
_layers = st.builds(
    pb.BatchNormLayer,
    name=st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20),
    running_mean=st.lists(_floats32, max_size=8),
    running_var=st.lists(_floats32, max_size=8),
    momentum=st.floats(),
    eps=st.floats(),
)


@FUZZ
@given(layers=st.lists(_layers, max_size=4), sha256=st.text(alphabet="0123456789abcdef", max_size=64))
def test_batchnorm_stats_parser(layers: list[pb.BatchNormLayer], sha256: str) -> None:
    message = pb.BatchNormStats(weights_sha256=sha256, layers=layers)
    attempt("BN stats parser", lambda: batchnorm_stats_from_proto(message))
