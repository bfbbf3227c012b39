"""The hash-chained audit log: any edit, deletion, insertion or reordering names its line."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from xkt.server.audit_log import GENESIS, AuditLog, entry_hash, verify_log
from xkt.shared.errors import ConfigError


def _write(path: Path, n: int = 5) -> list[str]:
    log = AuditLog(path)
    for i in range(n):
        log.record(site=f"site-{i}", rpc="FetchWeights", model_sha256="ab" * 32, bytes_sent=100 * i, outcome="OK")
    return path.read_text().splitlines(keepends=True)


def test_fresh_log_verifies_and_links(tmp_path: Path) -> None:
    lines = _write(tmp_path / "audit.jsonl")
    check = verify_log(tmp_path / "audit.jsonl")
    assert check.ok and check.entries == 5 and check.first_bad_line is None
    entries = [json.loads(line) for line in lines]
    assert entries[0]["prev"] == GENESIS and entries[1]["prev"] == entries[0]["hash"] == entry_hash(entries[0])
    assert check.head == entries[-1]["hash"]


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    _write(tmp_path / "audit.jsonl", 2)
    _write(tmp_path / "audit.jsonl", 2)
    check = verify_log(tmp_path / "audit.jsonl")
    assert check.ok and check.entries == 4


def _tamper(lines: list[str], how: str) -> list[str]:
    lines = list(lines)
    if how == "edit":
        lines[2] = lines[2].replace('"bytes_sent":200', '"bytes_sent":0')
    elif how == "edit-rehashed":  # an attacker who recomputes the edited line's own hash
        entry = json.loads(lines[2])
        entry["site"] = "someone-else"
        entry["hash"] = entry_hash(entry)
        lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    elif how == "delete":
        del lines[2]
    elif how == "reorder":
        lines[2], lines[3] = lines[3], lines[2]
    elif how == "insert-copy":
        lines.insert(3, lines[2])
    elif how == "garbage":
        lines[2] = "not json\n"
    elif how == "truncated-line":
        lines[-1] = lines[-1].rstrip("\n")
    return lines


@pytest.mark.parametrize(
    ("how", "bad_line"),
    [
        ("edit", 3),
        ("edit-rehashed", 4),
        ("delete", 3),
        ("reorder", 3),
        ("insert-copy", 4),
        ("garbage", 3),
        ("truncated-line", 5),
    ],
)
def test_tampering_names_the_first_bad_line(tmp_path: Path, how: str, bad_line: int) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(_tamper(_write(path), how)))
    check = verify_log(path)
    assert not check.ok and check.first_bad_line == bad_line, check
    with pytest.raises(ConfigError) as info:
        AuditLog(path)  # a broken chain is never extended
    assert info.value.reason == "audit-log-broken"


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")

    def work(site: str) -> None:
        for _ in range(10):
            log.record(site=site, rpc="GetManifest", model_sha256="ab" * 32, bytes_sent=1, outcome="OK")

    threads = [threading.Thread(target=work, args=(f"s{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    check = verify_log(tmp_path / "audit.jsonl")
    assert check.ok and check.entries == 40
