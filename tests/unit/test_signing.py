"""Owner keys, canonical JSON and Ed25519 signatures (xkt.shared.signing)."""

from __future__ import annotations

import enum
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from xkt.shared import signing
from xkt.shared.errors import ConfigError, VerificationError, XktError
from xkt.shared.signing import (
    PASSPHRASE_ENV,
    canonical_json,
    fingerprint,
    generate_keypair,
    is_fingerprint,
    load_private_key,
    load_public_key,
    sign,
    verify,
)


def _reason(excinfo: pytest.ExceptionInfo[XktError]) -> str:
    err = excinfo.value
    assert err.message and "\n" not in err.message and err.hint
    return err.reason


@pytest.fixture(autouse=True)
def _no_passphrase_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


# ------------------------------------------------------------------ generation


def test_generate_keypair_writes_0600_pkcs8_key_and_spki_public_key(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path / "keys")
    assert (key_path.name, pub_path.name) == ("owner.key", "owner.pub")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private, public = load_private_key(key_path), load_public_key(pub_path)
    assert fingerprint(private.public_key()) == fingerprint(public)


def test_private_key_file_is_created_0600_exclusively_from_the_first_syscall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        calls.append((str(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(signing.os, "open", spy)
    key_path, _ = generate_keypair(tmp_path, name="site")
    creations = [(flags, mode) for path, flags, mode in calls if path == str(key_path)]
    assert len(creations) == 1
    flags, mode = creations[0]
    assert flags & os.O_CREAT and flags & os.O_EXCL and mode == 0o600


def test_generate_keypair_refuses_to_overwrite_an_existing_key(tmp_path: Path) -> None:
    key_path, _ = generate_keypair(tmp_path)
    before = key_path.read_bytes()
    with pytest.raises(ConfigError) as excinfo:
        generate_keypair(tmp_path)
    assert _reason(excinfo) == "key-exists"
    assert key_path.read_bytes() == before


def test_generate_keypair_refuses_when_only_the_public_key_exists(tmp_path: Path) -> None:
    (tmp_path / "owner.pub").write_text("old")
    with pytest.raises(ConfigError) as excinfo:
        generate_keypair(tmp_path)
    assert _reason(excinfo) == "key-exists"
    assert not (tmp_path / "owner.key").exists()


# --------------------------------------------------------------------- loading


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_private_key_refuses_a_key_others_can_access(tmp_path: Path, mode: int) -> None:
    key_path, _ = generate_keypair(tmp_path)
    key_path.chmod(mode)
    with pytest.raises(ConfigError) as excinfo:
        load_private_key(key_path)
    assert _reason(excinfo) == "key-permissions"
    assert "chmod 600" in excinfo.value.hint


def test_missing_key_file(tmp_path: Path) -> None:
    for loader in (load_private_key, load_public_key):
        with pytest.raises(ConfigError) as excinfo:
            loader(tmp_path / "nope.key")
        assert _reason(excinfo) == "key-not-found"


def test_directory_instead_of_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_public_key(tmp_path)
    assert _reason(excinfo) == "key-not-a-file"


@pytest.mark.parametrize(
    "content", [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_garbage_private_key_is_bad_format(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "owner.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError) as excinfo:
        load_private_key(path)
    assert _reason(excinfo) == "bad-key-format"


def test_public_key_given_as_private_key_is_bad_format(tmp_path: Path) -> None:
    _, pub_path = generate_keypair(tmp_path)
    pub_path.chmod(0o600)
    with pytest.raises(ConfigError) as excinfo:
        load_private_key(pub_path)
    assert _reason(excinfo) == "bad-key-format"


def test_garbage_public_key_is_bad_format(tmp_path: Path) -> None:
    path = tmp_path / "owner.pub"
    path.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA me@host\n")
    with pytest.raises(ConfigError) as excinfo:
        load_public_key(path)
    assert _reason(excinfo) == "bad-key-format"


def test_private_key_given_as_public_key_is_refused(tmp_path: Path) -> None:
    key_path, _ = generate_keypair(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        load_public_key(key_path)
    assert _reason(excinfo) == "private-key-given"


def test_non_ed25519_keys_are_refused(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    key_path, pub_path = tmp_path / "ec.key", tmp_path / "ec.pub"
    key_path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    pub_path.write_bytes(
        ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for loader, path in ((load_private_key, key_path), (load_public_key, pub_path)):
        with pytest.raises(ConfigError) as excinfo:
            loader(path)
        assert _reason(excinfo) == "wrong-key-type"


def test_oversized_key_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "big.pub"
    path.write_bytes(b"A" * (signing.MAX_KEY_FILE_BYTES + 10))
    with pytest.raises(ConfigError) as excinfo:
        load_public_key(path)
    assert _reason(excinfo) == "key-too-large"


# ------------------------------------------------------------------ passphrases


def test_encrypted_key_with_passphrase_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_path, pub_path = generate_keypair(tmp_path, passphrase=b"correct horse")
    assert key_path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    expected = fingerprint(load_public_key(pub_path))

    with pytest.raises(ConfigError) as excinfo:
        load_private_key(key_path)
    assert _reason(excinfo) == "passphrase-required"

    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(ConfigError) as excinfo:
        load_private_key(key_path)
    assert _reason(excinfo) == "bad-passphrase"

    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    assert fingerprint(load_private_key(key_path).public_key()) == expected

    monkeypatch.delenv(PASSPHRASE_ENV)
    secret = tmp_path / "passphrase.txt"
    secret.write_bytes(b"correct horse\n")
    secret.chmod(0o600)
    assert fingerprint(load_private_key(key_path, passphrase_file=secret).public_key()) == expected


def test_passphrase_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    key_path, _ = generate_keypair(tmp_path, passphrase=b"pw")
    secret = tmp_path / "passphrase.txt"
    secret.write_bytes(b"pw")
    secret.chmod(0o644)
    with pytest.raises(ConfigError) as excinfo:
        load_private_key(key_path, passphrase_file=secret)
    assert _reason(excinfo) == "key-permissions"


# ------------------------------------------------------------------ signatures


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    key_path, pub_path = generate_keypair(tmp_path_factory.mktemp("keys"))
    return load_private_key(key_path), load_public_key(pub_path)


def test_sign_verify_round_trip_and_tampering(keypair: tuple[Any, Any], tmp_path: Path) -> None:
    private, public = keypair
    signature = sign(private, b"manifest bytes")
    assert len(signature) == 64
    verify(public, b"manifest bytes", signature)
    other = load_public_key(generate_keypair(tmp_path)[1])
    bad_cases = [
        (public, b"manifest bytes!", signature),
        (public, b"manifest bytes", signature[:-1] + bytes([signature[-1] ^ 1])),
        (public, b"manifest bytes", signature[:63]),
        (public, b"manifest bytes", b""),
        (other, b"manifest bytes", signature),
    ]
    for key, data, sig in bad_cases:
        with pytest.raises(VerificationError) as excinfo:
            verify(key, data, sig)
        assert _reason(excinfo) == "bad-signature"


def test_fingerprint_format(keypair: tuple[Any, Any]) -> None:
    fp = fingerprint(keypair[1])
    assert is_fingerprint(fp) and fp.startswith("ed25519:") and len(fp) == len("ed25519:") + 64
    assert not is_fingerprint(fp.upper()) and not is_fingerprint(fp[:-1]) and not is_fingerprint(None)


# -------------------------------------------------------------- canonical JSON


def test_canonical_json_exact_bytes() -> None:
    obj = {"b": [1, 2.5, True, None], "a": {"z": "é", "y": -0}, "c": (1, "x")}
    assert canonical_json(obj) == '{"a":{"y":0,"z":"é"},"b":[1,2.5,true,null],"c":[1,"x"]}'.encode()


class _Level(enum.IntEnum):
    ONE = 1


@pytest.mark.parametrize(
    "bad",
    [
        float("nan"),
        float("inf"),
        {"x": float("-inf")},
        {1: "int key"},
        {"s": {1, 2}},
        b"bytes",
        {"e": _Level.ONE},
        "\ud800",
        [object()],
    ],
)
def test_canonical_json_refuses_values_without_one_canonical_form(bad: Any) -> None:
    with pytest.raises(ValueError):
        canonical_json(bad)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_json_values)
def test_canonical_json_is_a_fixed_point_of_parsing(value: Any) -> None:
    encoded = canonical_json(value)
    assert canonical_json(json.loads(encoded)) == encoded
    assert json.loads(encoded) == json.loads(json.dumps(value))
