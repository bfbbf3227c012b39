"""Ed25519 owner keys, canonical JSON and detached signatures.

The model owner signs each artifact's manifest with one Ed25519 key; a site pins the
owner's public key and refuses anything else.  Keys are plain PEM files (PKCS#8 for the
private key, SubjectPublicKeyInfo for the public one) so standard tools can read them.

A problem with the user's own key files (missing, unreadable, readable by others, wrong
format or passphrase, or a key that would be overwritten) is a configuration error and
raises :class:`~xkt.shared.errors.ConfigError` (exit code 3); a signature that does not
verify raises :class:`~xkt.shared.errors.VerificationError` (exit code 4).  Both carry a
one-line message, a hint naming the fix and a stable ``reason`` slug.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from xkt.shared.errors import ConfigError, VerificationError
from xkt.shared.files import FileReasons, read_bounded_file, write_new_file

PASSPHRASE_ENV = "XKT_KEY_PASSPHRASE"
"""Environment variable holding the private key's passphrase (never a command-line argument)."""

MAX_KEY_FILE_BYTES = 64 * 1024
KEY_FILE_REASONS = FileReasons("key-not-found", "key-unreadable", "key-not-a-file", "key-too-large")
"""An Ed25519 PEM file is a few hundred bytes; anything far larger is not a key file."""

SIGNATURE_BYTES = 64

_FINGERPRINT_PREFIX = "ed25519:"


# ------------------------------------------------------------------ key generation


def generate_keypair(out_dir: Path, name: str = "owner", *, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Write ``<name>.key`` (PKCS#8 PEM, mode 0600) and ``<name>.pub``; return their paths.

    The private key file is created with mode 0600 by ``os.open`` itself, so it is never
    readable by others even for an instant, and ``O_EXCL`` refuses to overwrite a key that
    exists: losing an owner key would orphan every site that pinned it.
    """
    out_dir = Path(out_dir)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(
                f"refusing to overwrite the existing key file {path}",
                hint="choose another --out directory or name, or move the old key pair away yourself",
                reason="key-exists",
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    key_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    _write_new_file(key_path, key_pem, mode=0o600)
    _write_new_file(pub_path, public_key_pem(private_key.public_key()), mode=0o644)
    return key_path, pub_path


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    """The public key as PEM SubjectPublicKeyInfo (what ``<name>.pub`` holds)."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_new_file(path: Path, data: bytes, *, mode: int) -> None:
    """Create a key file exclusively, with its final mode from the first syscall."""
    hint = "choose another directory or name, or move the old key pair away yourself"
    write_new_file(path, data, mode=mode, what="key file", reason="key-exists", hint=hint)


# --------------------------------------------------------------------- key loading


def load_private_key(path: Path, *, passphrase_file: Path | None = None) -> Ed25519PrivateKey:
    """Load the owner's Ed25519 private key, refusing a file others can read.

    The passphrase (if the key is encrypted) comes from ``passphrase_file`` or else the
    ``XKT_KEY_PASSPHRASE`` environment variable; never from a command-line argument,
    which other local users can see in the process list.
    """
    pem = _read_key_file(Path(path), private=True)
    passphrase = _read_passphrase(passphrase_file)
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem
    if encrypted and passphrase is None:
        raise ConfigError(
            f"private key {path} is encrypted and no passphrase was given",
            hint=f"set {PASSPHRASE_ENV} or pass a passphrase file",
            reason="passphrase-required",
        )
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase if encrypted else None)
    except ValueError:
        if encrypted:
            raise ConfigError(
                f"could not decrypt private key {path}: wrong passphrase",
                hint=f"check {PASSPHRASE_ENV} or the passphrase file",
                reason="bad-passphrase",
            ) from None
        raise _bad_key_format(path, "a PEM PKCS#8 private key") from None
    except (TypeError, UnsupportedAlgorithm):
        raise _bad_key_format(path, "a PEM PKCS#8 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise _wrong_key_type(path, type(key).__name__)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a PEM SubjectPublicKeyInfo Ed25519 public key (an ``owner.pub`` file)."""
    path = Path(path)
    pem = _read_key_file(path, private=False)
    if b"PRIVATE KEY-----" in pem:
        raise ConfigError(
            f"{path} is a private key, not a public key",
            hint="pass the owner's .pub file; never copy the private key to a site",
            reason="private-key-given",
        )
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _bad_key_format(path, "a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise _wrong_key_type(path, type(key).__name__)
    return key


def _read_key_file(path: Path, *, private: bool) -> bytes:
    """Read a small key file; a private one must not be accessible to group or others."""
    return read_bounded_file(
        path,
        what="key",
        limit=MAX_KEY_FILE_BYTES,
        private=private,
        reasons=KEY_FILE_REASONS,
        missing_hint="check the path; `xkt-server keys init` creates owner.key and owner.pub",
    )


def _read_passphrase(passphrase_file: Path | None) -> bytes | None:
    """The passphrase from a file (trailing newline stripped) or the environment, else None."""
    if passphrase_file is not None:
        data = _read_key_file(Path(passphrase_file), private=True)
        return data.rstrip(b"\r\n") or None
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode("utf-8") if value else None


def _bad_key_format(path: Path, expected: str) -> ConfigError:
    return ConfigError(
        f"{path} is not {expected}",
        hint="pass a key file created by `xkt-server keys init` (PEM text, not OpenSSH or DER)",
        reason="bad-key-format",
    )


def _wrong_key_type(path: Path, found: str) -> ConfigError:
    return ConfigError(
        f"{path} holds a {found.removeprefix('_')}, not an Ed25519 key",
        hint="xkt signs with Ed25519 only; generate a key pair with `xkt-server keys init`",
        reason="wrong-key-type",
    )


# ------------------------------------------------------- fingerprints and signatures


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """``"ed25519:" + sha256(raw 32-byte public key).hex()``: what manifests and policies name."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _FINGERPRINT_PREFIX + hashlib.sha256(raw).hexdigest()


def is_fingerprint(value: object) -> bool:
    """Whether ``value`` is a well-formed fingerprint string (prefix plus 64 lowercase hex)."""
    if not isinstance(value, str) or not value.startswith(_FINGERPRINT_PREFIX):
        return False
    digest = value[len(_FINGERPRINT_PREFIX) :]
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``data`` (deterministic, RFC 8032)."""
    return private_key.sign(data)


def verify(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> None:
    """Return if ``signature`` is ``public_key``'s signature of ``data``; raise otherwise."""
    try:
        if len(signature) != SIGNATURE_BYTES:
            raise InvalidSignature
        public_key.verify(signature, data)
    except InvalidSignature:
        raise VerificationError(
            f"signature does not verify with key {fingerprint(public_key)}",
            hint="the data or the signature was altered after signing; re-fetch it from the owner",
            reason="bad-signature",
        ) from None


# ------------------------------------------------------------------ canonical JSON


def canonical_json(obj: Any) -> bytes:
    """The one byte string that represents ``obj``, so a signature over it is unambiguous.

    Rules (a JSON subset; anything else raises ``ValueError``):

    * values are ``dict`` (keys must be ``str``), ``list``/``tuple`` (written as arrays),
      ``str``, ``int``, ``bool``, ``None`` and finite ``float``; exact types only, so an
      ``IntEnum`` or a ``str`` subclass cannot change the output;
    * object keys sorted by code point, separators ``,`` and ``:`` with no whitespace;
    * strings are written as UTF-8, not ``\\u`` escapes (except control characters,
      ``"`` and ``\\``), and must be encodable (no lone surrogates);
    * floats use Python's shortest round-trip ``repr``; NaN and infinities are refused.
      Prefer ints and strings: floats appear only where a value is inherently real
      (normalisation mean/std).
    """
    _check_canonical_value(obj, "$")
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")  # UnicodeEncodeError (a ValueError) for lone surrogates


def strict_json_loads(raw: bytes) -> Any:
    """JSON from UTF-8 bytes, refusing duplicate keys and NaN/Infinity (ValueError)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("duplicate key in a JSON object")
        return result

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant)


def _check_canonical_value(value: Any, where: str) -> None:
    """Raise ``ValueError`` naming the JSON path of the first value outside the subset."""
    kind = type(value)
    if value is None or kind in (str, int, bool):
        return
    if kind is float:
        if not math.isfinite(value):
            raise ValueError(f"{where}: NaN and infinity have no canonical JSON form")
        return
    if kind in (list, tuple):
        for index, item in enumerate(value):
            _check_canonical_value(item, f"{where}[{index}]")
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ValueError(f"{where}: object key {key!r} is not a string")
            _check_canonical_value(item, f"{where}.{key}")
        return
    raise ValueError(f"{where}: {kind.__name__} is not a canonical JSON type")
