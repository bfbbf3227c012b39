"""The owner's Flower SuperLink as a child process, and the ``flwr`` command line pointed at it.

The SuperLink serves the Fleet API (sites), the Control API (``flwr run``: submit code that
every site runs) and the Runtime API on one port, and the open-source build does not
authenticate the Control API (../shared/reference/flower.md §6, §9).  So xkt binds it to
127.0.0.1 only, with TLS, SuperNode key authentication, ``--database`` (sites reconnect
after a restart) and runtime dependency installation off (it would otherwise download a
CUDA torch per run); sites reach it only through the fleet-only proxy
(:mod:`xkt.server.fleet_proxy`).

Every Flower process gets its own ``FLWR_HOME`` and telemetry and update checks switched
off, so nothing is written to ``~/.flwr`` and nothing phones home.

The same class also runs Flower's *simulation* SuperLink for ``xkt-bench federated``
(:class:`SimulationLinkConfig`): plain HTTP on 127.0.0.1, no state database, and the Ray
engine running virtual sites.  Flower's SuperExec starts in a session of its own and Ray's
daemons are its children, so stopping the SuperLink's process group does not reach them;
every process started from a SuperLink therefore carries a per-link tag in its environment
(:data:`TAG_ENV`), and :meth:`SuperLink.stop` ends whatever is left in the tagged processes'
sessions (never by name).
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from xkt.shared.errors import ConfigError, TransportError
from xkt.shared.flower_process import die_with_parent, flower_env, free_port, stop_group

CONNECTION = "xkt"  # the connection name in FLWR_HOME/config.toml
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
TAG_ENV = "XKT_SUPERLINK_TAG"  # inherited by every process a SuperLink starts (superexec, apps, Ray)
PROC = Path("/proc")


@dataclass(frozen=True)
class SuperLinkConfig:
    """How to run the SuperLink: always on loopback, always with TLS."""

    work: Path  # FLWR_HOME, the state database and the log live here
    tls_cert: Path
    tls_key: Path
    ca_cert: Path
    port: int = 0  # 0: a free port
    node_auth: bool = True

    @property
    def database(self) -> Path:
        return self.work / "superlink-state.db"

    @property
    def log(self) -> Path:
        return self.work / "superlink.log"

    @property
    def ca(self) -> Path | None:
        """The CA the ``flwr`` CLI and the health probe verify the SuperLink with."""
        return self.ca_cert

    def env(self) -> dict[str, str]:
        return {}

    def command(self, port: int) -> list[str]:
        args = ["flower-superlink", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.tls_cert)]
        args += ["--ssl-keyfile", str(self.tls_key), "--database", str(self.database)]
        args += ["--disable-runtime-dependency-installation", "--log-file", str(self.log)]
        return args + (["--enable-supernode-auth"] if self.node_auth else [])


@dataclass(frozen=True)
class SimulationLinkConfig:
    """A simulation SuperLink: plain HTTP on loopback (nothing leaves the host), Ray runs the virtual sites.

    Ray keeps its sockets and logs under ``ray_temp`` (``RAY_TMPDIR``), so a run neither joins
    another Ray cluster on the machine nor leaves files in ``/tmp/ray``.  Unix socket paths
    are limited to 107 bytes and Ray nests about 70 characters below it, so the caller
    passes a short path.
    """

    work: Path  # FLWR_HOME and the logs live here
    ray_temp: Path
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.work / "superlink.log"

    @property
    def ca(self) -> Path | None:
        return None

    def env(self) -> dict[str, str]:
        return {
            "RAY_TMPDIR": str(self.ray_temp),
            "RAY_ADDRESS": "",  # empty: start a private Ray instance, never attach to a running one
            "RAY_USAGE_STATS_ENABLED": "0",  # Ray phones home by default, like Flower
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            **self.extra_env,
        }

    def command(self, port: int) -> list[str]:
        args = ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port)]
        return args + ["--disable-runtime-dependency-installation", "--log-file", str(self.log)]


class SuperLink:
    """``with SuperLink(cfg) as link:`` a healthy SuperLink on 127.0.0.1:``link.port``; stopped on exit."""

    def __init__(self, cfg: SuperLinkConfig | SimulationLinkConfig) -> None:
        self.cfg = cfg
        self.port = cfg.port or free_port()
        self.home = cfg.work / "flwr-home"
        self.tag = uuid.uuid4().hex  # marks every process this link starts, see stop()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return self.cfg.command(self.port)

    def __enter__(self) -> SuperLink:
        self.cfg.work.mkdir(parents=True, exist_ok=True)
        write_connection(self.home, self.address, self.cfg.ca)
        env = flower_env(self.home, {**self.cfg.env(), TAG_ENV: self.tag})
        with (self.cfg.work / "superlink.out").open("ab") as sink:
            self.process = subprocess.Popen(  # its own session: stop() signals the whole group
                self.command(),
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # a SIGKILLed owner command does not leave the SuperLink behind
            )
        try:
            wait_healthy(self.address, self.cfg.ca, START_TIMEOUT_S, self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the SuperLink's process group, SIGKILL after a timeout; then end what it started elsewhere.

        Flower's SuperExec runs in a session of its own (and under it the ServerApp, or the
        simulation and Ray's daemons and workers); it exits by itself once the SuperLink is
        gone, but a hung one would not.  So the sessions of every process carrying this link's
        tag are noted first, and whatever is left in them, or still carries the tag, is ended
        too.  Sessions, because Ray rewrites its agents' process titles over their environment.
        """
        sessions = sessions_of(tagged_pids(self.tag))  # before the SuperExec, its session's leader, goes
        if self.process is not None and self.process.poll() is None:
            stop_group(self.process, STOP_TIMEOUT_S)
        self.process = None
        stop_pids(lambda: sorted(set(tagged_pids(self.tag)) | set(session_pids(sessions))), STOP_TIMEOUT_S)


def tagged_pids(tag: str, proc: Path = PROC) -> list[int]:
    """Live processes whose environment has ``TAG_ENV=tag`` (Linux ``/proc``; elsewhere none are found)."""
    marker = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in proc.glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, another user's, or a zombie
            continue
        if marker in environ.split(b"\0") and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return sorted(found)


def _session(pid: int, proc: Path = PROC) -> int | None:
    """The session id of ``pid`` from ``/proc/PID/stat`` (None when it is gone or a zombie)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]  # the name may hold spaces and ')'
    return None if state in ("Z", "X") else int(session)


def sessions_of(pids: list[int], proc: Path = PROC) -> set[int]:
    """The sessions ``pids`` belong to, never this process's own (a tagged process always starts a new one)."""
    sessions = {_session(pid, proc) for pid in pids}
    return {s for s in sessions if s is not None and s not in (0, os.getsid(0))}


def session_pids(sessions: set[int], proc: Path = PROC) -> list[int]:
    """Live processes in any of ``sessions``."""
    if not sessions:
        return []
    return sorted(int(e.name) for e in proc.glob("[0-9]*") if _session(int(e.name), proc) in sessions)


def stop_pids(find: Callable[[], list[int]], timeout_s: float) -> list[int]:
    """SIGTERM every process ``find()`` names, SIGKILL those still there after ``timeout_s``; returns those signalled."""
    pids = find()
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while (left := [pid for pid in find() if pid in pids]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone meanwhile; never another user's
        os.kill(pid, sig)


def wait_healthy(address: str, ca_cert: Path | None, timeout_s: float, process: subprocess.Popen[bytes] | None) -> None:
    """Poll ``/health`` until it answers 200 (bounded): over TLS verified with ``ca_cert``, or plain HTTP without one."""
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert is not None else None
    url = f"https://{address}/health" if ca_cert is not None else f"http://{address}/health"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise TransportError(
                f"the SuperLink exited with status {process.returncode} while starting",
                hint="see superlink.out and superlink.log in the work folder",
                reason="superlink-died",
            )
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as error:
            last = str(error)
        time.sleep(0.3)
    raise TransportError(
        f"the SuperLink on {address} did not become healthy within {timeout_s:.0f} s ({last})",
        hint="see superlink.out and superlink.log in the work folder",
        reason="superlink-not-healthy",
    )


def write_connection(home: Path, address: str, ca_cert: Path | None) -> None:
    """``FLWR_HOME/config.toml``: the one connection the ``flwr`` CLI uses, TLS with the owner's CA (or plain HTTP)."""
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{ca_cert.resolve()}"' if ca_cert is not None else "insecure = true"
    text = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
    (home / "config.toml").write_text(text, encoding="utf-8")


def flwr(home: Path, *args: str, timeout_s: float = 120.0, fine_if: str = "") -> subprocess.CompletedProcess[str]:
    """Run one ``flwr`` CLI command against the SuperLink; a failure is one clear error.

    ``fine_if``: a failure whose output (stdout or stderr) contains this text is not one.
    """
    completed = subprocess.run(
        ["flwr", *args], env=flower_env(home), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if fine_if and fine_if.lower() in (completed.stdout + completed.stderr).lower():
        return completed
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        raise ConfigError(
            f"`flwr {args[0]} {args[1] if len(args) > 1 else ''}` failed: {detail[-1] if detail else completed.returncode}",
            hint="see the SuperLink log in the work folder",
            reason="flwr-cli-failed",
        )
    return completed


def register_site(home: Path, public_key: Path, name: str) -> None:
    """Allow a SuperNode key (OpenSSH ``ecdsa-sha2-nistp384``) to join; a key registered before is fine."""
    flwr(home, "supernode", "register", str(public_key), CONNECTION, "--name", name, fine_if="already in use")
