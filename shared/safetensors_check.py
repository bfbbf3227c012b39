"""The weights file, checked by hand before safetensors (or anything else) reads a tensor.

It exists because the safetensors library trusts its header: this module first streams
``weights.safetensors`` through sha256 against the signed size and digest, then parses
the header itself with bounded length, known dtypes, offsets that tile the data exactly,
and precisely the tensor names, dtypes and shapes an architecture has.  Files often
mistaken for safetensors (a pickle, a PyTorch zip checkpoint, a Git LFS pointer) are
refused by name.  Every rejection is a :class:`~xkt.shared.errors.VerificationError`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from xkt.shared.errors import ConfigError, VerificationError
from xkt.shared.manifest import WeightsInfo, short
from xkt.shared.models import ArchSpec, expected_state
from xkt.shared.signing import strict_json_loads

WEIGHTS_FILE = "weights.safetensors"
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""safetensors itself allows 100 MB; our largest model's header is a few tens of KiB."""

_CHUNK = 1024 * 1024
_SNIFF_BYTES = 64
_LFS_MAGIC = b"version https://git-lfs"

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ST_DTYPE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

Expected = dict[str, tuple[tuple[int, ...], str]]
"""Tensor name → (shape, safetensors dtype) that an architecture's state dict has."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's safetensors header entry: dtype, shape and [begin, end) in the data."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]


def expected_for(arch: ArchSpec) -> Expected:
    """Names, shapes and dtypes of the architecture's state dict, computed on the meta device."""
    try:
        state = expected_state(arch)
    except ConfigError as exc:
        raise VerificationError(
            f"the manifest's architecture cannot be built: {exc.message}", hint=exc.hint, reason="unknown-architecture"
        ) from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise VerificationError(
            f"the manifest's architecture {arch.name!r} has invalid arguments ({short(str(exc))})",
            hint="the owner exported an architecture this xkt cannot build; ask them to re-export",
            reason="unknown-architecture",
        ) from None
    return {name: (shape, _ST_DTYPE.get(dtype, str(dtype))) for name, (shape, dtype) in state.items()}


# ------------------------------------------------------------ weights: size, digest


def read_weights_checked(path: Path, info: WeightsInfo) -> tuple[bytes, int]:
    """Stream the weights through sha256 once; return the header bytes read in that pass.

    Keeping the header bytes from the hashing pass means the header checked next is
    the one whose digest matched, even if the file is replaced in between.
    """
    size = path.stat().st_size
    if size != info.size:
        _reject_lfs_pointer(path)
        raise VerificationError(
            f"{WEIGHTS_FILE} has {size} bytes but the signed manifest says {info.size}",
            hint="the download is incomplete or the file was replaced; re-fetch the artifact",
            reason="size-mismatch",
        )
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        head = _read_head(handle, info.size + 1)
        digest.update(head)
        total = len(head) + _hash_rest(handle, digest.update, info.size + 1 - len(head))
    if total != info.size:
        raise VerificationError(
            f"{WEIGHTS_FILE} changed size while it was being read ({total} bytes, expected {info.size})",
            hint="something is writing to the artifact; wait for it to finish and retry",
            reason="size-mismatch",
        )
    if digest.hexdigest() != info.sha256:
        raise VerificationError(
            f"{WEIGHTS_FILE} sha256 {digest.hexdigest()} differs from the signed manifest's {info.sha256}",
            hint="the weights were altered or corrupted after signing; re-fetch the artifact",
            reason="digest-mismatch",
        )
    return head, total


def _read_head(handle: IO[bytes], limit: int) -> bytes:
    """The length prefix plus as much of the header as it claims (capped), at most ``limit`` bytes."""
    prefix = handle.read(min(8, limit))
    claimed = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    wanted = max(_SNIFF_BYTES, 8 + min(claimed, MAX_HEADER_BYTES)) - len(prefix)
    return prefix + handle.read(max(0, min(wanted, limit - len(prefix))))


def _hash_rest(handle: IO[bytes], update: Callable[[bytes], object], limit: int) -> int:
    """Feed the rest of the file to ``update`` in chunks, reading at most ``limit`` bytes."""
    total = 0
    while total < limit and (chunk := handle.read(min(_CHUNK, limit - total))):
        update(chunk)
        total += len(chunk)
    return total


def _reject_lfs_pointer(path: Path) -> None:
    """Name the commonest wrong-size case: a Git LFS pointer checked out instead of the weights."""
    with path.open("rb") as handle:
        _reject_impostors(handle.read(_SNIFF_BYTES), only_lfs=True)


# ---------------------------------------------------- weights: the safetensors header


def check_header(head: bytes, size: int, expected: Expected) -> dict[str, TensorEntry]:
    """Parse and check the safetensors header held in ``head`` for a file of ``size`` bytes."""
    length = _header_length(head, size)
    entries = _parse_header(head[8 : 8 + length])
    _check_dtypes(entries, expected)
    _check_offsets(entries, size - 8 - length)
    _check_names(entries, expected)
    _check_shapes(entries, expected)
    return entries


def _header_length(head: bytes, size: int) -> int:
    """The header's byte length; on anything implausible, first say what the file really is."""
    length = int.from_bytes(head[:8], "little") if size >= 8 else -1
    if 0 <= length <= min(MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{":
        return length
    _reject_impostors(head, only_lfs=False)
    if size < 8:
        raise VerificationError(
            f"{WEIGHTS_FILE} has only {size} bytes, too few for a safetensors file",
            hint="the file is truncated; re-export the artifact",
            reason="truncated",
        )
    if length > MAX_HEADER_BYTES or length > size - 8:
        limit = "the 16 MiB cap" if length > MAX_HEADER_BYTES else f"the {size - 8} bytes that follow it"
        raise VerificationError(
            f"{WEIGHTS_FILE} header claims {length} bytes, more than {limit}",
            hint="the file is corrupt or not a safetensors file; re-export the artifact",
            reason="header-too-large",
        )
    raise _bad_header("the header does not start with '{'")


def _reject_impostors(head: bytes, *, only_lfs: bool) -> None:
    """Recognise files commonly mistaken for safetensors, and refuse them by name."""
    if head.startswith(_LFS_MAGIC):
        raise VerificationError(
            f"{WEIGHTS_FILE} is a Git LFS pointer file, not the weights",
            hint="run `git lfs pull` in the repository the artifact came from, then retry",
            reason="lfs-pointer",
        )
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    if not only_lfs and (is_pickle or head.startswith(b"PK\x03\x04")):
        kind = "a Python pickle" if is_pickle else "a PyTorch zip checkpoint (pickle inside)"
        raise VerificationError(
            f"{WEIGHTS_FILE} is {kind}, not safetensors; it was not unpickled",
            hint="pickles can run code when loaded; export the weights with safetensors (`xkt-server import-weights`)",
            reason="pickle-not-safetensors",
        )


def _bad_header(detail: str) -> VerificationError:
    return VerificationError(
        f"{WEIGHTS_FILE} has a malformed safetensors header: {detail}",
        hint="the file is corrupt or was not written by safetensors; re-export the artifact",
        reason="bad-header",
    )


def _parse_header(raw: bytes) -> dict[str, TensorEntry]:
    """The header JSON as tensor entries; ``__metadata__`` may only map strings to strings."""
    try:
        data = strict_json_loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _bad_header(f"not valid JSON ({short(str(exc))})") from None
    if not isinstance(data, dict):
        raise _bad_header("not a JSON object")
    metadata = data.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(_is_utf8_text(item) for item in (*metadata, *metadata.values())):
        raise VerificationError(
            f"{WEIGHTS_FILE} __metadata__ is not an object of strings",
            hint="the file was not written by safetensors; re-export the artifact",
            reason="bad-metadata",
        )
    return {name: _parse_entry(name, value) for name, value in data.items()}


def _is_utf8_text(value: Any) -> bool:
    """A string safetensors (Rust, strict UTF-8) reads the same way: no lone surrogates."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_entry(name: str, value: Any) -> TensorEntry:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise _bad_header(f"entry {short(repr(name))} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad_header(f"{short(repr(name))} shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise _bad_header(f"{short(repr(name))} data_offsets must be two non-negative integers")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:  # a list or object is unhashable: test the type first
        raise _dtype_error(f"tensor {short(repr(name))} has unknown dtype {short(repr(dtype))}")
    return TensorEntry(dtype=dtype, shape=tuple(shape), data_offsets=(offsets[0], offsets[1]))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _dtype_error(message: str) -> VerificationError:
    return VerificationError(
        f"{WEIGHTS_FILE}: {message}",
        hint="xkt artifacts store float32 weights and int64 counters; convert with `model.float()` and re-export",
        reason="dtype-mismatch",
    )


def _check_dtypes(entries: dict[str, TensorEntry], expected: Expected) -> None:
    for name, entry in entries.items():
        want = expected.get(name, (None, entry.dtype))[1]
        if entry.dtype != want:
            raise _dtype_error(f"tensor {name!r} is {entry.dtype}, expected {want}")


def _check_offsets(entries: dict[str, TensorEntry], data_len: int) -> None:
    """Offsets must tile the data exactly: no gap, no overlap, no trailing bytes, right sizes."""
    cursor = 0
    for (begin, end), name in sorted((entry.data_offsets, name) for name, entry in entries.items()):
        entry = entries[name]
        if begin != cursor or end < begin or end > data_len:
            problem = (
                "runs past the end of the data (truncated file?)" if end > data_len else "overlaps or leaves a gap"
            )
            raise _offsets_error(f"tensor {short(repr(name))} at [{begin}, {end}) {problem}")
        if end - begin != math.prod(entry.shape) * _ITEMSIZE[entry.dtype]:
            raise _offsets_error(f"tensor {short(repr(name))} spans {end - begin} bytes, not what its shape needs")
        cursor = end
    if cursor != data_len:
        raise _offsets_error(f"tensors cover {cursor} of the {data_len} data bytes")


def _offsets_error(message: str) -> VerificationError:
    return VerificationError(
        f"{WEIGHTS_FILE}: {message}",
        hint="the file is corrupt or truncated; re-export the artifact",
        reason="bad-offsets",
    )


def _check_names(entries: dict[str, TensorEntry], expected: Expected) -> None:
    missing, unexpected = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing:
        raise VerificationError(
            f"{WEIGHTS_FILE} lacks {len(missing)} tensor(s) the architecture has: {_list(missing)}",
            hint="the weights belong to another architecture or were saved partially; re-export the model",
            reason="missing-tensors",
        )
    if unexpected:
        raise VerificationError(
            f"{WEIGHTS_FILE} has {len(unexpected)} tensor(s) the architecture lacks: {_list(unexpected)}",
            hint="the weights belong to another architecture; re-export with the matching --arch",
            reason="unexpected-tensors",
        )


def _check_shapes(entries: dict[str, TensorEntry], expected: Expected) -> None:
    for name, (shape, _dtype) in expected.items():
        if entries[name].shape != shape:
            raise VerificationError(
                f"tensor {name!r} has shape {short(str(list(entries[name].shape)))}, "
                f"but the architecture expects {list(shape)}",
                hint="the weights were trained for another architecture or class count; re-export with the right one",
                reason="shape-mismatch",
            )


def _list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(short(repr(n), 80) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
