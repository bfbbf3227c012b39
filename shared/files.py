"""Reading and creating small sensitive files (keys, certificates, tokens) safely.

Every reader of a key, certificate or token needs the same guarantees: the file checked
is the file read (``fstat`` on the open descriptor), a FIFO cannot hang the open, a
directory or device is refused, a private file readable by others is refused, and the
read is bounded.  Creating such a file must never replace one or expose it, even
briefly.  One implementation serves the signing keys, the TLS files and the tokens;
callers choose the wording and the reason slugs their users see.

Replacing a file that is not secret but must never be seen half-written (an index, a
run record, a checkpoint pointer) goes through :func:`replace_file`; making a rename
durable goes through :func:`fsync_dir`.  A write that fails because the disk is full
becomes one clear error through :func:`disk_full_error`, never an "internal error".
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xkt.shared.errors import ConfigError


@dataclass(frozen=True)
class FileReasons:
    """The ``reason`` slugs one kind of file reports for each failure."""

    not_found: str
    unreadable: str
    not_a_file: str
    too_large: str


def read_bounded_file(
    path: Path, *, what: str, limit: int, private: bool, reasons: FileReasons, missing_hint: str
) -> bytes:
    """Read at most ``limit`` bytes of a regular file; ``private`` also refuses group/other access."""
    try:  # O_NONBLOCK: opening a FIFO must not hang; it is refused below as not a regular file
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist", hint=missing_hint, reason=reasons.not_found) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what} file {path}: {exc.strerror}",
            hint="check the path and that this user may read it",
            reason=reasons.unreadable,
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # checked before fdopen, which refuses a directory itself
        os.close(fd)
        raise ConfigError(
            f"{what} file {path} is not a regular file",
            hint=f"pass the path of the {what} file itself",
            reason=reasons.not_a_file,
        )
    with os.fdopen(fd, "rb") as handle:
        if private:
            refuse_shared_mode(path, info.st_mode)
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(
            f"{what} file {path} is larger than {limit} bytes, so it is not a {what} file",
            hint=f"pass the {what} file xkt wrote",
            reason=reasons.too_large,
        )
    return data


def refuse_shared_mode(path: Path, mode: int) -> None:
    """Raise ConfigError if a private file's mode lets group or others in."""
    if mode & 0o077:
        raise ConfigError(
            f"private key {path} is accessible by other users (mode {stat.S_IMODE(mode):04o})",
            hint=f"run `chmod 600 {path}` (and consider the key compromised if others could read it)",
            reason="key-permissions",
        )


def write_new_file(
    path: Path,
    data: bytes,
    *,
    mode: int,
    what: str = "file",
    reason: str = "file-exists",
    hint: str = "choose another folder, or move the old file away yourself",
) -> None:
    """Create ``path`` exclusively with ``mode`` from the first syscall, write and fsync it.

    ``O_EXCL`` refuses to replace anything (a key, a certificate, a symlink planted in its
    place), and creating with the final mode means a key is never readable by others.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise ConfigError(f"refusing to overwrite the existing {what} {path}", hint=hint, reason=reason) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def replace_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to a sibling temporary file, fsync, then rename over ``path``.

    A crash at any point leaves the old file or the new one, never half of one, and no
    temporary file behind when the write itself fails.
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename or a new directory entry durable (directories are fsynced by fd)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(error: OSError) -> bool:
    """True for "no space left on device" and "disk quota exceeded"."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(what: str, where: Path, hint: str) -> ConfigError:
    """The error a command reports when writing ``what`` under ``where`` ran out of space (exit 3)."""
    return ConfigError(
        f"no space left on the device holding {where} while writing {what}", hint=hint, reason="disk-full"
    )
