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
"""

from __future__ import annotations

import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from xkt.shared.errors import ConfigError, TransportError
from xkt.shared.flower_process import die_with_parent, flower_env, free_port, stop_group

CONNECTION = "xkt"  # the connection name in FLWR_HOME/config.toml
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


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


class SuperLink:
    """``with SuperLink(cfg) as link:`` a healthy SuperLink on 127.0.0.1:``link.port``; stopped on exit."""

    def __init__(self, cfg: SuperLinkConfig) -> None:
        self.cfg = cfg
        self.port = cfg.port or free_port()
        self.home = cfg.work / "flwr-home"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cfg = self.cfg
        args = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--ssl-ca-certfile", str(cfg.ca_cert), "--ssl-certfile", str(cfg.tls_cert)]
        args += ["--ssl-keyfile", str(cfg.tls_key), "--database", str(cfg.database)]
        args += ["--disable-runtime-dependency-installation", "--log-file", str(cfg.log)]
        return args + (["--enable-supernode-auth"] if cfg.node_auth else [])

    def __enter__(self) -> SuperLink:
        self.cfg.work.mkdir(parents=True, exist_ok=True)
        write_connection(self.home, self.address, self.cfg.ca_cert)
        with (self.cfg.work / "superlink.out").open("ab") as sink:
            self.process = subprocess.Popen(  # its own session: the superexec and app children go with it
                self.command(),
                env=flower_env(self.home),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # a SIGKILLed owner command does not leave the SuperLink behind
            )
        try:
            wait_healthy(self.address, self.cfg.ca_cert, START_TIMEOUT_S, self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the SuperLink's process group (its superexec and apps), SIGKILL after a timeout."""
        if self.process is not None and self.process.poll() is None:
            stop_group(self.process, STOP_TIMEOUT_S)
        self.process = None


def wait_healthy(address: str, ca_cert: Path, timeout_s: float, process: subprocess.Popen[bytes] | None) -> None:
    """Poll ``https://ADDRESS/health`` until it answers 200 (bounded), verifying the server with ``ca_cert``."""
    context = ssl.create_default_context(cafile=str(ca_cert))
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
            with urllib.request.urlopen(f"https://{address}/health", context=context, timeout=2) as response:
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


def write_connection(home: Path, address: str, ca_cert: Path) -> None:
    """``FLWR_HOME/config.toml``: the one connection the ``flwr`` CLI uses, TLS with the owner's CA."""
    home.mkdir(parents=True, exist_ok=True)
    text = (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\nroot-certificates = "{ca_cert.resolve()}"\n'
    )
    (home / "config.toml").write_text(text, encoding="utf-8")


def flwr(home: Path, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run one ``flwr`` CLI command against the SuperLink; a failure is one clear error."""
    completed = subprocess.run(
        ["flwr", *args], env=flower_env(home), capture_output=True, text=True, timeout=timeout_s, check=False
    )
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
    try:
        flwr(home, "supernode", "register", str(public_key), CONNECTION, "--name", name)
    except ConfigError as error:
        if "already" not in error.message.lower():
            raise
