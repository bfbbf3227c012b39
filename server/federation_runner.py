"""``xkt-server federate`` from start to end: SuperLink, site keys, fleet proxy, the run, the result.

The owner's host runs, all as children of one command that stops them all at the end:

1. a SuperLink on 127.0.0.1 (TLS, node authentication, a state database, no run-time
   dependency installation; :mod:`xkt.server.superlink`);
2. the sites' SuperNode public keys registered with it (only those keys can join);
3. the fleet-only TLS proxy on the public address (:mod:`xkt.server.fleet_proxy`): sites
   reach the Fleet API and ``/health``, never the Control or Runtime API;
4. ``flwr run`` of the xkt app bundle with a typed run config, its output streamed;
5. the round table read back from ``OUT/rounds.json``.

The app bundle's sha256 (what sites pin in ``site.toml``) is computed here the way Flower
computes it, by building the bundle: it is deterministic (fixed zip timestamps).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xkt.server.federated_server import FederationConfig
from xkt.server.fleet_proxy import FleetProxy, FleetProxyConfig
from xkt.server.superlink import CONNECTION, SuperLink, SuperLinkConfig, register_site
from xkt.shared.config import toml_value
from xkt.shared.errors import ConfigError, TransportError
from xkt.shared.flower_process import flower_env, stop_group

APP_DIR = Path(__file__).resolve().parent / "xkt-federated"
LineFn = Callable[[str], None]


def app_sha256(app_dir: Path = APP_DIR) -> str:
    """The bundle's sha256 as Flower reports it (``flwr build`` is deterministic); sites pin this."""
    with tempfile.TemporaryDirectory(prefix="xkt-fab-") as folder:
        completed = subprocess.run(
            ["flwr", "build", "--app", str(app_dir)],
            cwd=folder,
            env=flower_env(Path(folder) / "home"),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        built = sorted(Path(folder).glob("*.fab"))
        if completed.returncode != 0 or len(built) != 1:
            raise ConfigError(
                f"could not build the app bundle in {app_dir}: {completed.stdout.strip()[-300:]}",
                hint="reinstall xkt; the bundle ships with it",
                reason="fab-build-failed",
            )
        return hashlib.sha256(built[0].read_bytes()).hexdigest()


@dataclass(frozen=True)
class FederateRequest:
    """What ``xkt-server federate`` was asked to do."""

    work: Path  # SuperLink state, logs, the proxy's files and the results (OUT)
    tls_cert: Path  # server certificate (SANs: the public name and 127.0.0.1) ...
    tls_key: Path
    ca_cert: Path  # ... and the CA it chains to (sites trust it)
    site_keys: tuple[Path, ...]  # SuperNode public keys allowed to join
    run: FederationConfig
    listen: str = "127.0.0.1:0"  # the proxy's public address; port 0: a free one
    superlink_port: int = 0
    run_timeout_s: float = 0.0  # 0: rounds × (join + round timeout) + a margin


def federate(request: FederateRequest, on_line: LineFn, on_ready: Callable[[str, str], None]) -> dict[str, Any]:
    """Run the whole federation; ``on_ready(public_address, app_sha256)`` is called once sites can join."""
    for key in request.site_keys:
        if not key.is_file():
            raise ConfigError(f"site key {key} does not exist", hint="pass each site's supernode.pub with --site-key")
    fab = app_sha256()
    link_cfg = SuperLinkConfig(
        work=request.work / "superlink",
        tls_cert=request.tls_cert,
        tls_key=request.tls_key,
        ca_cert=request.ca_cert,
        port=request.superlink_port,
    )
    with ExitStack() as stack:
        link = stack.enter_context(SuperLink(link_cfg))
        for key in request.site_keys:
            register_site(link.home, key, name=key.stem)
        proxy = stack.enter_context(FleetProxy(_proxy_config(request, link.port)))
        on_ready(proxy.address, fab)
        started = time.monotonic()
        _run_app(link, request, on_line)
        seconds = time.monotonic() - started
    rounds_file = Path(request.run.out_dir) / "rounds.json"
    if not rounds_file.is_file():  # the ServerApp stopped before its first round (its error is in the output above)
        raise ConfigError(
            "the federated run ended before any round completed",
            hint="see the run's output above; usually fewer than --min-sites sites joined within --join-timeout",
            reason="no-rounds",
        )
    rounds = json.loads(rounds_file.read_text(encoding="utf-8"))
    return {"ok": True, "app_sha256": fab, "seconds": round(seconds, 1), **rounds}


def _proxy_config(request: FederateRequest, superlink_port: int) -> FleetProxyConfig:
    host, _, port = request.listen.rpartition(":")
    return FleetProxyConfig(
        listen_host=host or "127.0.0.1",
        listen_port=int(port or 0),
        tls_cert=request.tls_cert,
        tls_key=request.tls_key,
        upstream_port=superlink_port,
        upstream_ca=request.ca_cert,
        work=request.work / "proxy",
    )


def _run_app(link: SuperLink, request: FederateRequest, on_line: LineFn) -> None:
    """``flwr run`` the bundle with the typed run config and stream its output until the run ends."""
    run_config = write_run_config(request.work / "run-config.toml", request.run)
    stream_run(link.home, run_config, request.run_timeout_s or _default_timeout(request.run), on_line)


def write_run_config(path: Path, cfg: FederationConfig) -> Path:
    """``cfg`` as the TOML file ``flwr run --run-config`` reads (hyphenated keys, as the bundle declares them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_toml(asdict(cfg)), encoding="utf-8")
    return path


def stream_run(home: Path, run_config: Path, timeout_s: float, on_line: LineFn, extra_args: Sequence[str] = ()) -> None:
    """``flwr run APP_DIR`` against the SuperLink whose connection is in ``home``, streaming its output.

    ``extra_args`` go to ``flwr run`` as they are, e.g. ``("--federation-config",
    "num-supernodes=4")`` for a simulation.  A watchdog stops a run that outlives
    ``timeout_s``, even a silent one; a failed or timed-out run is raised as an error.
    """
    command = ["flwr", "run", str(APP_DIR), CONNECTION, "--run-config", str(run_config), "--stream", *extra_args]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        env=flower_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(timeout_s, stop_group, args=(process, 15.0))  # a silent, hung run is stopped too
    watchdog.start()
    assert process.stdout is not None
    try:
        for line in process.stdout:
            on_line(line.rstrip("\n"))
        process.wait(timeout=30)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            stop_group(process, 15.0)  # type: ignore[arg-type]
    if time.monotonic() - started >= timeout_s:
        raise TransportError(
            f"the federated run did not finish within {timeout_s:.0f} s",
            hint="raise the timeouts, or see the sites' SuperNode logs",
            reason="run-timeout",
        )
    if process.returncode != 0:
        raise ConfigError(f"`flwr run` exited with status {process.returncode}", hint="see its output above")


def _default_timeout(cfg: FederationConfig) -> float:
    return (cfg.rounds + 1) * (cfg.join_timeout_s + cfg.round_timeout_s) + 300.0


def _toml(values: dict[str, Any]) -> str:
    """Flower's run config as TOML (hyphenated keys, as the bundle's pyproject declares them)."""
    return "".join(f"{name.replace('_', '-')} = {toml_value(value)}\n" for name, value in values.items())


def read_site_keys(paths: Sequence[Path]) -> tuple[Path, ...]:
    """The site keys, each checked to be an OpenSSH NIST P-curve public key (Flower refuses others)."""
    for path in paths:
        head = path.read_text(encoding="utf-8").split(" ", 1)[0] if path.is_file() else ""
        if not head.startswith("ecdsa-sha2-nistp"):
            raise ConfigError(
                f"{path} is not an OpenSSH ECDSA public key",
                hint="create the site's key with `xkt-client join-key --out DIR` and pass DIR/supernode.pub",
                reason="bad-site-key",
            )
    return tuple(paths)
