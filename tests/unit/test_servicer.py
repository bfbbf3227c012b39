"""The servicer's pure helpers: request validation and chunking from disk."""

from __future__ import annotations

import hashlib
import io

import grpc
import pytest

from xkt.server.servicer import Refusal, check_chunk_size, check_digest, check_offset, iter_chunks
from xkt.shared.errors import ConfigError
from xkt.shared.manifest import WeightsInfo

WEIGHTS = WeightsInfo("ab" * 32, 1000)


@pytest.mark.parametrize(
    ("sha256", "code"),
    [
        ("AB" * 32, grpc.StatusCode.INVALID_ARGUMENT),
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("cd" * 32, grpc.StatusCode.NOT_FOUND),
    ],
)
def test_check_digest(sha256: str, code: grpc.StatusCode) -> None:
    check_digest("ab" * 32, WEIGHTS)
    with pytest.raises(Refusal) as info:
        check_digest(sha256, WEIGHTS)
    assert info.value.code == code


def test_check_offset_allows_the_end_and_refuses_beyond() -> None:
    check_offset(0, 1000)
    check_offset(1000, 1000)
    with pytest.raises(Refusal) as info:
        check_offset(1001, 1000)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_chunk_size_bounds() -> None:
    assert check_chunk_size(65536) == 65536
    for bad in (65535, 1024 * 1024 + 1):
        with pytest.raises(ConfigError):
            check_chunk_size(bad)


def test_iter_chunks_stops_at_the_signed_size() -> None:
    data = bytes(range(256)) * 10 + b"appended-after-signing"
    chunks = list(iter_chunks(io.BytesIO(data), 7, 2560, 1000))
    assert [c.offset for c in chunks] == [7, 1007, 2007]
    assert b"".join(c.data for c in chunks) == data[7:2560]
    assert all(c.sha256 == hashlib.sha256(c.data).hexdigest() for c in chunks)


def test_iter_chunks_raises_on_a_shrunken_file() -> None:
    with pytest.raises(OSError):
        list(iter_chunks(io.BytesIO(b"x" * 10), 0, 20, 8))
