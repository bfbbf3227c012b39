"""How xkt starts Flower processes on either side: environment, ports, and stopping a process group.

Every Flower command creates ``$FLWR_HOME`` (default ``~/.flwr``) with a telemetry id and
phones home unless told not to (../shared/reference/flower.md §9.7), and Flower's daemons
start children of their own (superexec, app processes).  So each xkt-started Flower process
gets its own ``FLWR_HOME``, telemetry and update checks off, this virtualenv's scripts
first on ``PATH``, and its own session, whose whole group is stopped together.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def flower_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process xkt starts: own FLWR_HOME, no telemetry, this venv first."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` (IPv4 or IPv6, brackets allowed) a moment ago: bind to 0, read it, close."""
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def stop_group(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Stop a child started with ``start_new_session=True`` and everything in its group."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass
    with contextlib.suppress(ProcessLookupError):  # leftovers of the group (app processes) after the leader exited
        os.killpg(process.pid, signal.SIGKILL)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """``preexec_fn`` for a child in its own session: SIGTERM it when the parent process dies (Linux).

    Children started with ``start_new_session=True`` (so that their whole group stops
    together) would otherwise outlive a parent killed with SIGKILL and keep running.
    """
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parent's own clean-up still stops it
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
