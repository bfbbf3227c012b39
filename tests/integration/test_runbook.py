"""The operator runbook, docs/operations.md, runs from zero, block by block and in order.

The page's own convention (its "How to read this page" section) says what runs:

* a ```` ```sh ```` block runs in a fresh ``bash`` with ``set -euo pipefail`` and must exit 0;
* ```` ```sh {expect=N} ```` must exit N (a refusal the page promises, e.g. a revoked site);
* ```` ```sh {env} ```` defines variables and shell functions: it runs, and is then prepended to
  every later block, as an operator pastes it into every new shell;
* ```` ```sh {deploy} ```` needs a container runtime or a service manager and is skipped.

Every other fence must be a language this test does not run (text, toml, json), so a command
cannot hide from it.  The page's variables point into a temporary folder; addresses are loopback
and ports free ones.  Each block runs in its own session; the services the page starts in the
background are found by their PID files and by the processes left in that session, and are
stopped by PID at the end, never by name.  The owner, site A and site B share this one machine,
which is how the page's ``# owner → site`` copies work here.

Between sections the test checks what the page promises on disk (modes, kits, the revocation
list, the audit log, the policy pins, the backup); the refusals themselves are the page's
``{expect=N}`` blocks.  A quick first test checks only the page's convention, so a malformed
page fails even where the tools for the full run are missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = REPO / "docs" / "operations.md"
BIN = Path(sys.executable).parent
BLOCK_TIMEOUT_S = 600.0
STOP_GRACE_S = 30.0

TOOLS = ("openssl", "jq", "sqlite3", "nginx")


# ---------------------------------------------------------------------------------------------- the story


def test_the_page_follows_its_own_convention() -> None:
    """Sections 0-9 in order, each with commands; every fence is sh with known tags, or a language nobody runs."""
    blocks = parse(RUNBOOK.read_text(encoding="utf-8"))
    assert sorted({b.section for b in blocks}) == list(range(10))
    assert [b.section for b in blocks] == sorted(b.section for b in blocks)
    # the refusals the page promises: exit 4 (not the trusted owner key, an edited audit log), 6 (a revoked site)
    assert {b.expect for b in blocks} == {0, 4, 6}


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS),
    reason="the runbook needs openssl, jq, sqlite3 and nginx (make install installs nginx)",
)
def test_the_runbook_runs_from_zero_in_order(book: Runbook, where: Where) -> None:
    book.run_section(0)  # the folders
    assert mode(where.owner) == 0o700 and mode(where.site_etc) == 0o700

    book.run_section(1)  # the CA and server certificate; site A by CSR, site B by an owner-made kit
    assert mode(where.pki / "ca.key") == 0o600 and mode(where.pki / "server.key") == 0o600
    assert names(where.site_etc / "kit") == ["ca.crt", "site.crt", "site.csr", "site.key"]
    assert mode(where.site_etc / "kit" / "site.key") == 0o600
    assert not (where.pki / "sites" / "depth-a" / "site.key").exists()  # the CSR path: the key never left site A
    assert not (where.pki / "sites" / "depth-b" / "site.key").exists()  # the owner deleted its copy after shipping
    assert names(where.site_b_etc / "kit") == ["ca.crt", "site.crt", "site.key"]
    assert (where.pki / "sites" / "owner-probe" / "site.key").is_file()  # the health probe's kit stays with the owner
    assert pki_json(where, "revoked.json")["revoked"] == []  # present from the start, for deploy/'s services

    book.run_section(2)  # the owner key and a signed model
    assert mode(where.owner / "keys" / "owner.key") == 0o600
    assert manifest(where.owner / "models" / "current")["model_version"] == "1"

    book.run_section(3)  # serve with mutual TLS; a token listener, checked by site A, then stopped
    assert json.loads((where.run / "serve.json").read_text())["transport"] == "mutual TLS"
    tokens = (where.owner / "tokens" / "tokens.txt").read_text()
    assert re.fullmatch(r"depth-a:[0-9a-f]{64}\n", tokens)  # only the hash is stored
    assert (where.site_etc / "token").read_text().strip() not in tokens
    assert mode(where.site_etc / "token") == 0o600
    assert not (where.run / "serve-tokens.pid").exists()

    book.run_section(4)  # onboarding: validate, doctor, fetch, adapt; one federated round
    assert (where.site_home / "out" / "shot" / "report.md").is_file()
    result = json.loads((where.run / "federate.json").read_text().splitlines()[-1])
    assert [(r["round"], r["replied"], r["failed"]) for r in result["rounds"]] == [(1, 1, [])]
    assert (where.site_home / "out" / "federated" / "adapted" / "manifest.json").is_file()
    assert audit(where)[-1]["outcome"] == "OK" and {e["site"] for e in audit(where)} == {"depth-a"}

    book.run_section(5)  # rotation: the old certificate is revoked, the new one works
    issued = [e["serial"] for e in pki_json(where, "index.json")["sites"] if e["site_id"] == "depth-a"]
    assert len(issued) == 2 and revoked(where) == {issued[0]}
    assert names(where.site_etc / "kit") == ["ca.crt", "site.crt", "site.csr", "site.key"]
    assert not (where.site_etc / "kit.old").exists()

    book.run_section(6)  # revocation: site B is refused, and the audit log says so
    assert len(revoked(where)) == 2  # site A's old certificate and site B's
    assert audit(where)[-1]["outcome"] == "UNAUTHENTICATED"

    before = (where.owner / "audit" / "audit.log").read_bytes()
    book.run_section(7)  # the chain verifies; an edited copy does not
    assert (where.owner / "audit" / "audit.log").read_bytes() == before  # the page tampered with a copy only

    book.run_section(8)  # a pinned new bundle, model version 2, then version 3 under a new owner key
    trusted = re.search(r"^allowed_owner_keys = \[(.*)\]$", (where.site_home / "site" / "site.toml").read_text(), re.M)
    assert trusted is not None and len(trusted[1].split(",")) == 2  # the old and the new owner key
    first, current = (manifest(where.owner / "models" / name) for name in ("xkt-source-1", "current"))
    assert current["model_version"] == "3" and current["owner_key_fingerprint"] != first["owner_key_fingerprint"]
    assert not (where.owner / "keys.retired").exists() and not (where.owner / "keys.next").exists()

    book.run_section(9)  # an encrypted secrets archive, a plain state archive, and a passing restore check
    (backup,) = (where.root / "backup").iterdir()
    with tarfile.open(backup / "state.tar.gz") as state:
        members = state.getnames()
    assert "pki/revoked.json" in members and "tokens/tokens.txt" in members
    assert not [m for m in members if m.endswith(".key")]  # no private key in the plain archive
    assert (backup / "superlink-state.db").is_file() and (backup / "secrets.tar.cms").is_file()
    assert not (where.offline / "restore-check").exists()  # the page cleans up its scratch copy

    book.assert_every_block_ran()


# ---------------------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Where:
    """The page's variables, pointed into one temporary folder (owner, sites and offline side by side)."""

    root: Path

    @property
    def owner(self) -> Path:
        return self.root / "owner"

    @property
    def pki(self) -> Path:
        return self.owner / "pki"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def site_etc(self) -> Path:
        return self.root / "site-a" / "etc"

    @property
    def site_home(self) -> Path:
        return self.root / "site-a" / "var"

    @property
    def site_b_etc(self) -> Path:
        return self.root / "site-b" / "etc"

    @property
    def offline(self) -> Path:
        return self.root / "offline"

    def environment(self) -> dict[str, str]:
        """A clean environment: this venv first on PATH, a private HOME, the page's variables and free ports."""
        return {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.root / "home"),
            "LANG": "C.UTF-8",
            "COLUMNS": "120",
            "XKT_OWNER": str(self.owner),
            "XKT_RUN": str(self.run),
            "XKT_LOGS": str(self.root / "log"),
            "XKT_BACKUP": str(self.root / "backup"),
            "XKT_SERVER_NAME": "localhost",
            "XKT_LISTEN_HOST": "127.0.0.1",
            "XKT_GRPC_PORT": str(free_port()),
            "XKT_TOKEN_PORT": str(free_port()),
            "XKT_FLEET_PORT": str(free_port()),
            "XKT_SITE_ETC": str(self.site_etc),
            "XKT_SITE_HOME": str(self.site_home),
            "XKT_SRC": str(REPO),
            "XKT_SRC_NEXT": str(REPO),  # the "next release" is this checkout: the same bundle hash
            "XKT_SITE_B_ETC": str(self.site_b_etc),
            "XKT_OFFLINE": str(self.offline),
        }


@pytest.fixture
def where(tmp_path: Path) -> Where:
    (tmp_path / "home").mkdir()
    return Where(tmp_path)


@pytest.fixture
def book(where: Where) -> Iterator[Runbook]:
    runbook = Runbook(parse(RUNBOOK.read_text(encoding="utf-8")), where.environment(), where.root, where.run)
    try:
        yield runbook
    finally:
        runbook.stop_everything()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def manifest(model: Path) -> dict[str, str]:
    return dict(json.loads((model / "manifest.json").read_text()))


def pki_json(where: Where, name: str) -> dict[str, list[dict[str, str]]]:
    return dict(json.loads((where.pki / name).read_text()))


def revoked(where: Where) -> set[str]:
    return {e["serial"] for e in pki_json(where, "revoked.json")["revoked"]}


def audit(where: Where) -> list[dict[str, object]]:
    return [json.loads(line) for line in (where.owner / "audit" / "audit.log").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------------------------------------- the page


FENCE = re.compile(r"^```(?P<lang>\S*)(?:\s+\{(?P<tags>[^}]*)\})?\s*$")
SECTION = re.compile(r"^## (\d+)\. ")
NOT_RUN = {"text", "toml", "json"}


@dataclass(frozen=True)
class Block:
    """One ```sh block: where it is on the page, its code and its tags."""

    line: int
    section: int
    code: str
    expect: int = 0
    env: bool = False
    deploy: bool = False


def parse(page: str) -> list[Block]:
    """The page's sh blocks in order; any other fence must be a language nobody runs."""
    blocks: list[Block] = []
    lines = page.splitlines()
    section: int | None = None
    index = 0
    while index < len(lines):
        if heading := SECTION.match(lines[index]):
            section = int(heading[1])
        fence = FENCE.match(lines[index])
        index += 1
        if fence is None:
            continue
        start = index
        while not lines[index].startswith("```"):
            index += 1
        code, index = "\n".join(lines[start:index]) + "\n", index + 1
        if fence["lang"] != "sh":
            assert fence["lang"] in NOT_RUN and not fence["tags"], f"line {start}: use ```sh for commands"
            continue
        blocks.append(block_of(start, section, code, (fence["tags"] or "").split()))
    return blocks


def block_of(line: int, section: int | None, code: str, tags: list[str]) -> Block:
    expect = [int(t.removeprefix("expect=")) for t in tags if re.fullmatch(r"expect=\d+", t)]
    unknown = [t for t in tags if t not in {"env", "deploy"} and not re.fullmatch(r"expect=\d+", t)]
    assert not unknown, f"line {line}: unknown tag(s) {unknown}; use env, deploy or expect=N"
    assert section is not None, f"line {line}: a command block before the first numbered section"
    return Block(line, section, code, expect[0] if expect else 0, "env" in tags, "deploy" in tags)


# ---------------------------------------------------------------------------------------------- running it


@dataclass
class Runbook:
    """Runs the page's blocks in order, one section at a time, and keeps track of what they started."""

    pending: list[Block]
    env: dict[str, str]
    cwd: Path
    pid_dir: Path
    definitions: list[str] = field(default_factory=list)
    started: set[tuple[int, int]] = field(default_factory=set)  # (pid, start time): never a reused PID
    since: int = field(default_factory=lambda: boot_ticks())  # nothing that started before this is ours
    seconds: dict[str, float] = field(default_factory=dict)  # per section and per block, for the log

    def run_section(self, number: int) -> None:
        """Run every block of section ``number``, which must be the next section on the page."""
        assert self.pending and self.pending[0].section == number, f"section {number} is not next on the page"
        started = time.monotonic()
        while self.pending and self.pending[0].section == number:
            block = self.pending.pop(0)
            if not block.deploy:
                self.run_block(block)
        self.seconds[f"section {number}"] = round(time.monotonic() - started, 1)

    def assert_every_block_ran(self) -> None:
        assert not self.pending, f"blocks left unrun from line {self.pending[0].line}"
        print("seconds:", self.seconds)  # shown with pytest -s or -rP

    def run_block(self, block: Block) -> None:
        script = "set -euo pipefail\n" + "".join(self.definitions) + block.code
        started = time.monotonic()
        log = self.cwd / "blocks" / f"line-{block.line}.log"
        log.parent.mkdir(exist_ok=True)
        with log.open("wb") as output:  # a file, not a pipe: a service started in the background keeps it open
            bash = subprocess.Popen(
                ["bash", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
            try:
                status: int | None = bash.wait(timeout=BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                status = None
            self.track(bash.pid)
            if status is None:
                os.killpg(bash.pid, signal.SIGKILL)
                bash.wait()
        self.seconds[f"line {block.line}"] = round(time.monotonic() - started, 1)
        shown = log.read_text(errors="replace")[-6000:]
        where = f"docs/operations.md line {block.line}"
        assert status is not None, f"{where}: still running after {BLOCK_TIMEOUT_S:.0f} s\n{block.code}\n{shown}"
        assert status == block.expect, f"{where}: exit {status}, expected {block.expect}\n{block.code}\n{shown}"
        if block.env:
            self.definitions.append(block.code)

    def track(self, session: int) -> None:
        """Remember the processes a block left behind: its session, its PID files, and their descendants."""
        processes = {pid: p for pid, p in list_processes().items() if p.start >= self.since}
        mine = {pid for pid, p in processes.items() if p.session == session}
        for pid_file in self.pid_dir.glob("*.pid"):
            text = pid_file.read_text().strip()
            if text.isdigit() and int(text) in processes:
                mine.add(int(text))
        mine |= {pid for pid, start in self.started if alive(pid, start)}
        for pid in descendants(mine, processes):
            self.started.add((pid, processes[pid].start))

    def stop_everything(self) -> None:
        """SIGTERM what the page started (services shut down their children), then SIGKILL what is left."""
        self.track(-1)  # children a service spawned after its block ended
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, start in sorted(self.started):
                if alive(pid, start):
                    with contextlib.suppress(ProcessLookupError):  # it may exit in between
                        os.kill(pid, sig)
            deadline = time.monotonic() + STOP_GRACE_S
            while any(alive(pid, start) for pid, start in self.started) and time.monotonic() < deadline:
                time.sleep(0.2)


@dataclass(frozen=True)
class Process:
    parent: int
    session: int
    start: int  # clock ticks after boot: with the PID, it names one process for good
    state: str


def boot_ticks() -> int:
    """Now, in the unit of a process's start time in /proc/PID/stat: clock ticks after boot."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def list_processes() -> dict[int, Process]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := read_stat(int(entry.name))) is not None:
            table[int(entry.name)] = info
    return table


def read_stat(pid: int) -> Process | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return Process(parent=int(fields[1]), session=int(fields[3]), start=int(fields[19]), state=fields[0])


def descendants(roots: set[int], processes: dict[int, Process]) -> set[int]:
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, p in processes.items() if p.parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int, start: int) -> bool:
    """Still running and still the same process (an exited one that nobody reaped counts as gone)."""
    info = read_stat(pid)
    return info is not None and info.start == start and info.state != "Z"
