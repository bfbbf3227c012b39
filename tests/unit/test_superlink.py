"""The SuperLink's command lines and connections (TLS and simulation), and how it finds what it started."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xkt.server.superlink import (
    TAG_ENV,
    SimulationLinkConfig,
    SuperLinkConfig,
    session_pids,
    sessions_of,
    stop_pids,
    tagged_pids,
    write_connection,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


def test_the_tls_superlink_keeps_its_flags(tmp_path: Path) -> None:
    cfg = SuperLinkConfig(
        work=tmp_path, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem", ca_cert=tmp_path / "ca"
    )
    args = cfg.command(9999)
    assert args[:5] == ["flower-superlink", "--host", "127.0.0.1", "--port", "9999"]
    assert "--insecure" not in args and "--simulation" not in args
    assert {
        "--ssl-certfile",
        "--database",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    } <= set(args)
    assert cfg.ca == tmp_path / "ca" and cfg.env() == {}


def test_the_simulation_superlink_is_plain_http_on_loopback_with_a_private_ray(tmp_path: Path) -> None:
    cfg = SimulationLinkConfig(work=tmp_path, ray_temp=tmp_path / "ray")
    args = cfg.command(9999)
    assert {"--insecure", "--simulation", "--disable-runtime-dependency-installation"} <= set(args)
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert cfg.ca is None
    env = cfg.env()
    assert env["RAY_TMPDIR"] == str(tmp_path / "ray") and env["RAY_ADDRESS"] == ""
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_the_connection_is_tls_with_the_ca_or_insecure_without_one(tmp_path: Path) -> None:
    write_connection(tmp_path / "tls", "127.0.0.1:1", tmp_path / "ca.pem")
    tls = (tmp_path / "tls" / "config.toml").read_text()
    assert "root-certificates" in tls and "insecure" not in tls
    write_connection(tmp_path / "sim", "127.0.0.1:1", None)
    sim = (tmp_path / "sim" / "config.toml").read_text()
    assert 'address = "127.0.0.1:1"' in sim and "insecure = true" in sim and "root-certificates" not in sim


def _spawn_session(tag: str) -> subprocess.Popen[bytes]:
    """A tagged process in a new session that starts an untagged child in the same session (like Ray's agents)."""
    script = "import os, subprocess, sys, time\n"
    script += "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], env={})\n"
    script += "time.sleep(60)\n"
    env = {**os.environ, TAG_ENV: tag}
    return subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)


def test_stop_finds_tagged_processes_and_the_untagged_ones_in_their_session() -> None:
    leader = _spawn_session("unit-test-tag")
    try:
        deadline = time.monotonic() + 10
        while len(session_pids({leader.pid})) < 2:  # the untagged child has started
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert tagged_pids("unit-test-tag") == [leader.pid]
        sessions = sessions_of(tagged_pids("unit-test-tag"))
        assert sessions == {leader.pid}
        members = session_pids(sessions)
        assert leader.pid in members and len(members) == 2
        stopped = stop_pids(lambda: sorted(set(tagged_pids("unit-test-tag")) | set(session_pids(sessions))), 5.0)
        assert sorted(stopped) == sorted(members)
        leader.wait(timeout=5)
        deadline = time.monotonic() + 5
        while session_pids(sessions):
            assert time.monotonic() < deadline, "the untagged child survived"
            time.sleep(0.05)
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_no_tag_no_session_matches_nothing_and_never_our_own_session() -> None:
    assert tagged_pids("no-such-tag") == []
    assert sessions_of([os.getpid()]) == set()
    assert session_pids(set()) == []
