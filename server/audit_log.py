"""Append-only, hash-chained audit log: who fetched which model digest, when, and how it ended.

One JSON object per line.  Each entry carries the hash of the previous entry (``prev``)
and its own ``hash``: the sha256 of the entry's canonical JSON without ``hash``.  The
first entry's ``prev`` is :data:`GENESIS`.  Editing any line changes its hash; deleting
or reordering lines breaks the ``prev`` links or the ``seq`` count, so
:func:`verify_log` names the first line that no longer fits.

A chain cannot show that its *last* lines were cut off; :func:`verify_log` returns the
head hash so an operator can record it elsewhere (a ticket, a second host) and compare.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xkt.shared.errors import ConfigError

GENESIS = "0" * 64
_FIELDS = ("seq", "time", "site", "rpc", "model_sha256", "bytes_sent", "outcome", "prev", "hash")


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 hex of the entry's canonical JSON with its ``hash`` member left out."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True)
class LogCheck:
    """Result of :func:`verify_log`: ``ok``, entries read, the first bad line (1-based) and why."""

    ok: bool
    entries: int
    head: str
    first_bad_line: int | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head": self.head,
            "first_bad_line": self.first_bad_line,
            "reason": self.reason,
        }


def _check_line(raw: bytes, seq: int, prev: str) -> tuple[dict[str, Any] | None, str]:
    """The parsed entry if ``raw`` is entry ``seq`` following ``prev``; else ``(None, why)``."""
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "not a JSON object"
    if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
        return None, "missing or unknown fields"
    if entry["hash"] != entry_hash(entry):
        return None, "entry hash does not match its content (edited)"
    if entry["prev"] != prev:
        return None, "previous-hash link is broken (a line was deleted, inserted or reordered)"
    if entry["seq"] != seq:
        return None, f"sequence number {entry['seq']!r}, expected {seq}"
    return entry, ""


def verify_log(path: Path) -> LogCheck:
    """Walk the chain from the first line; stop at the first line that does not fit."""
    prev, count = GENESIS, 0
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                return LogCheck(False, count, prev, number, "last line is incomplete (no newline)")
            entry, why = _check_line(raw, count, prev)
            if entry is None:
                return LogCheck(False, count, prev, number, why)
            prev, count = str(entry["hash"]), count + 1
    return LogCheck(True, count, prev)


class AuditLog:
    """Thread-safe appender: every RPC outcome becomes one fsynced, chained line.

    Opening an existing log verifies it first and refuses to extend a broken chain, so
    tampering is noticed at the next server start and not buried under new entries.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        check = verify_log(self.path) if self.path.exists() else LogCheck(True, 0, GENESIS)
        if not check.ok:
            raise ConfigError(
                f"audit log {self.path} is broken at line {check.first_bad_line}: {check.reason}",
                hint="keep the broken log as evidence (move it aside) and start a new one with --audit-log",
                reason="audit-log-broken",
            )
        self._prev, self._seq = check.head, check.entries

    def record(self, *, site: str, rpc: str, model_sha256: str, bytes_sent: int, outcome: str) -> None:
        """Append one entry and fsync it before returning."""
        with self._lock:
            entry: dict[str, Any] = {
                "seq": self._seq,
                "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "site": site,
                "rpc": rpc,
                "model_sha256": model_sha256,
                "bytes_sent": bytes_sent,
                "outcome": outcome,
                "prev": self._prev,
            }
            entry["hash"] = entry_hash(entry)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, _canonical(entry) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            self._prev, self._seq = entry["hash"], self._seq + 1
