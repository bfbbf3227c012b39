"""Hypothesis strategies for what a hostile client can put on the wire: bodies and metadata.

Request bodies come in five kinds, so every handler sees each of them:

* a real request message with random field values (huge offsets, malformed or nearly
  right sha256 strings, unicode, empty), serialised by protobuf;
* random bytes;
* a valid request with random bits flipped;
* well-formed protobuf wire data with odd or unknown fields, wrong wire types, negative
  or over-long varints;
* a valid request followed by such fields.

Metadata is always *valid* HTTP/2 metadata (gRPC's client refuses anything else before
it is sent, so it could never reach the server): lowercase keys, printable ASCII values,
binary values under ``-bin`` keys, with or without the right bearer token.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

Metadata = tuple[tuple[str, str | bytes], ...]

UINT64 = 2**64
MAX_FIELD_NUMBER = 2**29 - 1


# ------------------------------------------------------------------ protobuf wire format by hand


def varint(value: int) -> bytes:
    """Base-128 varint of ``value`` taken modulo 2**64 (how protobuf sends a negative int64)."""
    value %= UINT64
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One field: tag varint, then ``payload`` (already encoded for the wire type)."""
    return varint((number << 3) | wire_type) + payload


def length_delimited(number: int, data: bytes) -> bytes:
    return field(number, 2, varint(len(data)) + data)


field_numbers = st.one_of(st.integers(1, 6), st.sampled_from([15, 16, 2047, 2048, MAX_FIELD_NUMBER]))
_odd_field = st.one_of(
    st.builds(lambda n, v: field(n, 0, varint(v)), field_numbers, st.integers(-(2**63), UINT64 - 1)),
    st.builds(lambda n, v: field(n, 0, b"\xff" * 10 + v), field_numbers, st.binary(max_size=2)),  # over-long varint
    st.builds(lambda n, d: length_delimited(n, d), field_numbers, st.binary(max_size=128)),
    st.builds(lambda n, t: length_delimited(n, t.encode("utf-8")), field_numbers, st.text(max_size=64)),
    st.builds(lambda n, d: field(n, 1, d), field_numbers, st.binary(min_size=8, max_size=8)),
    st.builds(lambda n, d: field(n, 5, d), field_numbers, st.binary(min_size=4, max_size=4)),
    st.builds(lambda n, w, d: field(n, w, d), field_numbers, st.sampled_from([3, 4, 6, 7]), st.binary(max_size=8)),
    st.builds(
        lambda n, claimed, d: field(n, 2, varint(claimed) + d),
        field_numbers,
        st.integers(0, 2**40),
        st.binary(max_size=16),
    ),
)
odd_fields = st.lists(_odd_field, max_size=6).map(b"".join)
"""Well-formed or subtly broken protobuf wire data: unknown fields, wrong types, lying lengths."""


def _flip(data: bytes, positions: Sequence[int]) -> bytes:
    if not data:
        return bytes([positions[0] % 256])
    out = bytearray(data)
    for position in positions:
        bit = position % (8 * len(out))
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def bit_flipped(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """``valid`` bodies with 1 to 4 random bits flipped."""
    return st.builds(_flip, valid, st.lists(st.integers(0, 2**20), min_size=1, max_size=4))


def request_bodies(structured: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Every kind of body (see the module docstring) built around one request type."""
    return st.one_of(
        structured,
        structured,  # twice: well-formed requests reach the handlers' own checks more often
        st.binary(max_size=512),
        bit_flipped(structured),
        odd_fields,
        st.builds(bytes.__add__, structured, odd_fields),
    )


# ------------------------------------------------------------------ field values


def sha256_texts(true_sha256: str) -> st.SearchStrategy[str]:
    """The served digest, near misses of it, other hex, unicode, empty and huge strings."""
    hexdigits = "0123456789abcdef"
    return st.one_of(
        st.just(true_sha256),
        st.just(true_sha256),
        st.just(true_sha256.upper()),
        st.builds(
            lambda i, c: true_sha256[:i] + c + true_sha256[i + 1 :],
            st.integers(0, 63),
            st.sampled_from([*hexdigits, "A", "g", " ", "\x00", "é", "\U0001f600"]),
        ),
        st.builds(lambda n: true_sha256[:n], st.integers(0, 63)),
        st.builds(lambda tail: true_sha256 + tail, st.text(min_size=1, max_size=8)),
        st.text(alphabet=hexdigits, min_size=64, max_size=64),
        st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=100),
        st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "0"]), st.integers(0, 300_000)),
    )


def offsets(size: int) -> st.SearchStrategy[int]:
    """Resume offsets: the edges of the file, anywhere in it, and anything a uint64 holds."""
    edges = [0, 1, size - 1, size, size + 1, 2**31, 2**32, 2**63 - 1, 2**63, UINT64 - 1]
    return st.one_of(st.sampled_from(edges), st.integers(0, size + 16), st.integers(0, UINT64 - 1))


# ------------------------------------------------------------------ metadata

_printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
_keys = st.from_regex(r"x-[a-z0-9_.-]{1,20}", fullmatch=True)


def metadata(token: str) -> st.SearchStrategy[Metadata]:
    """Call metadata: mostly the right token (so requests reach the handler), else junk or none."""
    valid: Metadata = (("authorization", f"Bearer {token}"),)
    entry = st.one_of(
        st.tuples(st.just("authorization"), _printable),
        st.tuples(st.just("authorization"), _printable.map(lambda t: "Bearer " + t)),
        st.tuples(st.just("authorization"), st.just(f"Bearer {token}")),
        st.tuples(_keys, _printable),
        st.tuples(_keys.map(lambda k: k + "-bin"), st.binary(max_size=200)),
        st.tuples(_keys, st.integers(0, 20_000).map(lambda n: "v" * n)),  # beyond the 16 KiB metadata limit
    )
    junk = st.lists(entry, max_size=5).map(tuple)
    return st.one_of(
        st.just(valid),
        st.just(valid),
        st.builds(lambda extra: valid + extra, junk),
        junk,
        st.just(()),
    )
