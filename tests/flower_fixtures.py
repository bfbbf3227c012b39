"""A real Flower SuperLink for tests: TLS on 127.0.0.1, its own FLWR_HOME, stopped with its whole process group.

Import it the way the tests import ``tls_fixtures`` (``tests/`` put on ``sys.path`` by the
test file).  :func:`superlink` starts ``flower-superlink`` with certificates from the
project's own CA helpers (:func:`xkt.server.provision.init_pki`: SAN DNS ``localhost`` and
IP ``127.0.0.1``, which the SuperLink's internal SuperExec dials), runtime dependency
installation off, telemetry and update checks off, on a free port; it yields once
``GET /health`` answers 200 over verified TLS.

Stopping
    The SuperLink spawns a ``flower-superexec`` child (and that one ServerApp processes),
    so it runs in a new session and process group that this module created.  At the end
    the SuperLink gets SIGTERM; once it has exited (left unreaped, so its PID, which is
    the group id, cannot be reused) whatever is left in the group gets SIGTERM, then
    SIGKILL; only then is the SuperLink reaped.  Nothing outside that group is signalled.

:func:`https_request` is a tiny ``http.client`` helper that sends the path exactly as
given (no normalisation), which the proxy tests need to try ``..`` and ``%2e`` tricks.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from xkt.server.provision import PkiPaths, init_pki
from xkt.shared.flower_process import flower_env, free_port  # the product's own: tests start Flower the same way

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it


def tls_context(ca: Path | None) -> ssl.SSLContext:
    """A client context that trusts only ``ca`` (or, with None, the system store)."""
    return ssl.create_default_context(cafile=None if ca is None else str(ca))


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes


def https_request(
    port: int,
    method: str,
    path: str,
    *,
    context: ssl.SSLContext,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    server_hostname: str = "localhost",
    timeout_s: float = 10.0,
) -> Reply:
    """One request over TLS, the path sent byte for byte as given; the certificate must match ``server_hostname``."""
    raw = socket.create_connection((host, port), timeout=timeout_s)
    try:
        tls = context.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise
    conn = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=context)
    conn.sock = tls  # already connected and verified against server_hostname
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


# ------------------------------------------------------------------ a real flower-superlink


@dataclass(frozen=True)
class RunningSuperLink:
    proc: subprocess.Popen[bytes]
    port: int
    pki: PkiPaths  # ca_cert verifies it; server_cert/server_key are what it presents
    home: Path
    log: Path

    def context(self) -> ssl.SSLContext:
        return tls_context(self.pki.ca_cert)

    def request(self, method: str, path: str, **kwargs: object) -> Reply:
        """A request straight to the SuperLink's port (bypassing any proxy)."""
        return https_request(self.port, method, path, context=self.context(), **kwargs)  # type: ignore[arg-type]


def superlink_args(port: int, pki: PkiPaths, *, supernode_auth: bool, database: Path | None) -> list[str]:
    args = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.server_cert)]
    args += ["--ssl-keyfile", str(pki.server_key), "--disable-runtime-dependency-installation"]
    if supernode_auth:
        args.append("--enable-supernode-auth")
    if database is not None:
        args += ["--database", str(database)]
    return args


@contextlib.contextmanager
def superlink(
    root: Path,
    *,
    supernode_auth: bool = False,
    database: Path | None = None,
    pki: PkiPaths | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
) -> Iterator[RunningSuperLink]:
    """A TLS ``flower-superlink`` on 127.0.0.1 with state and logs under ``root``; stopped with its group.

    ``pki`` defaults to a new ``root/pki`` from :func:`init_pki`.  Fails the test (with the
    log's tail) if it does not answer ``/health`` within ``start_timeout_s``.
    """
    pki = pki or init_pki(root / "pki")
    home, log = root / "flwr-home-superlink", root / "superlink.log"
    for _attempt in range(START_ATTEMPTS):
        port = free_port()
        args = superlink_args(port, pki, supernode_auth=supernode_auth, database=database)
        proc = start_in_own_group(args, flower_env(home), log)
        try:
            if wait_for_health(proc, port, tls_context(pki.ca_cert), start_timeout_s):
                break
        except BaseException:
            stop_group(proc)
            raise
        stop_group(proc)
        if "address already in use" not in log.read_text(errors="replace").lower():
            pytest.fail(f"flower-superlink did not become healthy in {start_timeout_s} s:\n{log_tail(log)}")
    else:
        pytest.fail(f"flower-superlink found no free port in {START_ATTEMPTS} tries:\n{log_tail(log)}")
    try:
        yield RunningSuperLink(proc, port, pki, home, log)
    finally:
        stop_group(proc)


def start_in_own_group(args: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session (so a new process group) with stdout+stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True
        )


def wait_for_health(proc: subprocess.Popen[bytes], port: int, context: ssl.SSLContext, timeout_s: float) -> bool:
    """True once ``GET /health`` answers 200 over verified TLS; False if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError, ssl.SSLError, http.client.HTTPException):
            if https_request(port, "GET", "/health", context=context, timeout_s=2.0).status == 200:
                return True
        time.sleep(0.2)
    return False


def log_tail(log: Path, chars: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-chars:]
    return ""


# ------------------------------------------------------------------ stopping a process group we created


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the leader; then SIGTERM, SIGKILL what is left of its group; then reap the leader.

    ``proc`` must have been started with ``start_new_session=True`` (its PID is the group id).
    The leader stays an unreaped zombie until the group is empty, so the group id cannot be
    reused by an unrelated process while we signal it; a leader reaped before (by ``poll()``)
    leaves the id pinned only while a member lives, so the group is signalled only then.
    """
    pgid = proc.pid
    if proc.returncode is None and not _exited(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pgid, signal.SIGTERM)
        if not _wait(lambda: _exited(pgid), timeout_s):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    # Unreaped, the leader pins the group id; reaped earlier (a poll() saw it die), the id stays
    # pinned exactly as long as a member is alive, which is when _others_in_group finds one.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _others_in_group(pgid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        _wait(lambda: not _others_in_group(pgid), timeout_s / 3)
    proc.wait(timeout=timeout_s)


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (``WNOWAIT``)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # already reaped
    return info is not None


def _others_in_group(pgid: int) -> list[int]:
    """Live processes (not zombies) in process group ``pgid`` other than its leader, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pgid:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _wait(done: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.05)
    return done()
