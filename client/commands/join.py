"""``xkt-client join`` and ``xkt-client join-key``: take part in the owner's federated rounds."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer

from xkt.client.supernode import (
    JoinConfig,
    create_node_key,
    known_node_id,
    release_stale_session,
    start_supernode,
)
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.errors import TransportError
from xkt.shared.flower_process import stop_group
from xkt.shared.log import emit_json, logger, stderr_console
from xkt.shared.site_policy import load_policy


def join_key(
    out: Annotated[Path, typer.Option("--out", help="Folder for supernode.key (0600) and supernode.pub.")],
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Create the site's SuperNode key pair (P-384, OpenSSH); give supernode.pub to the owner."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        private, public = create_node_key(out)
        if json_output:
            emit_json({"ok": True, "private_key": str(private), "public_key": str(public)})
        else:
            stderr_console().print(f"wrote {private} (keep secret) and {public} (send to the owner)", markup=False)


def join(
    superlink: Annotated[str, typer.Option("--superlink", help="HOST:PORT of the owner's fleet proxy.")],
    site: Annotated[Path, typer.Option("--site", help="The site folder (its site.toml holds the \\[policy] table).")],
    key: Annotated[Path, typer.Option("--key", help="The SuperNode private key (from `xkt-client join-key`).")],
    ca_cert: Annotated[Path, typer.Option("--ca-cert", help="The owner's CA certificate.")],
    owner_key: Annotated[Path, typer.Option("--owner-key", help="The owner's public key the model must verify with.")],
    out: Annotated[Path, typer.Option("--out", help="Site output: local model, rounds log, adapted model, report.")],
    until_finished: Annotated[
        bool, typer.Option("--until-finished", help="Exit once the final round has published the adapted model.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.0, help="Give up after this many seconds (0: never).")
    ] = 0.0,
    threads: Annotated[
        int, typer.Option("--threads", min=0, help="Torch threads for local training (0: default).")
    ] = 0,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Start this site's SuperNode: it dials out to the owner, nothing listens here.

    Every round runs only if SITE/site.toml's \\[policy] table allows the owner key, the method and
    the app bundle's sha256; then only shared parameters and allowed metrics leave the site.
    """
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        load_policy(site)  # a malformed policy is refused before anything starts
        cfg = JoinConfig(superlink, site, out, key, ca_cert, owner_key, threads=threads)
        report, log = out / "report.json", out / "supernode.log"
        stopping: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
        deadline = time.monotonic() + timeout if timeout else None
        before = report.stat().st_mtime if report.exists() else None
        log_mark = log.stat().st_size if log.exists() else 0
        process, restarts = _start(cfg, json_output), 0
        try:
            while not stopping:
                code = process.poll()
                if code is not None:  # e.g. Flower refused to activate a key whose killed session is still "online"
                    restarts += 1
                    process = _restart(cfg, code, deadline if restarts <= MAX_RESTARTS else 0.0, json_output)
                    continue
                if until_finished and report.exists() and report.stat().st_mtime != before:
                    _wait_reply_sent(log, log_mark, deadline)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TransportError(
                        f"no finished federation within {timeout:.0f} s",
                        hint=f"see {out / 'supernode.log'}",
                        reason="join-timeout",
                    )
                time.sleep(0.5)
        finally:
            if process.poll() is None:
                stop_group(process, 15.0)
        if json_output:
            emit_json({"ok": True, "out": str(out), "report": str(report) if report.exists() else None})


RESTART_DELAY_S = 5.0
MAX_RESTARTS = 24  # about two minutes of refused activations: longer than Flower keeps a dead session


def _start(cfg: JoinConfig, json_output: bool) -> subprocess.Popen[bytes]:
    node = known_node_id(cfg.out)
    if node is not None and release_stale_session(cfg, node):  # a killed predecessor's session, if any
        logger.info("ended the previous session of node %d", node)
    process = start_supernode(cfg)
    if json_output:
        emit_json({"event": "joined", "superlink": cfg.superlink, "supernode_pid": process.pid})
    stderr_console().print(f"site joined via {cfg.superlink}; SuperNode pid {process.pid}", markup=False)
    return process


def _restart(cfg: JoinConfig, code: int, deadline: float | None, json_output: bool) -> subprocess.Popen[bytes]:
    """Start the SuperNode again after it exited (``_start`` ends a killed predecessor's session first)."""
    if deadline is not None and time.monotonic() > deadline:
        raise TransportError(
            f"the SuperNode exited with status {code}",
            hint=f"see {cfg.out / 'supernode.log'}",
            reason="supernode-exited",
        )
    logger.warning("the SuperNode exited with status %s; starting it again", code)
    if known_node_id(cfg.out) is None:
        time.sleep(RESTART_DELAY_S)  # without a node id, only time frees a killed session (~1 min in Flower)
    return _start(cfg, json_output)


SENT = b"Sent successfully"  # what flwr 1.41's SuperNode logs once a reply reached the SuperLink


def _wait_reply_sent(log: Path, since: int, deadline: float | None) -> None:
    """After the final round's report is written, give the SuperNode time to deliver its reply.

    The report is written inside the ClientApp, before Flower sends the reply; stopping the
    SuperNode at that moment would leave the owner waiting for a site that already finished.
    The SuperNode logs each delivered reply; wait (bounded) until the last one after the
    report appears.
    """
    limit = time.monotonic() + 60.0 if deadline is None else min(deadline, time.monotonic() + 60.0)
    while time.monotonic() < limit:
        with log.open("rb") as handle:
            handle.seek(since)
            tail = handle.read()
        finish = tail.rfind(b"evaluate.finish")
        if finish >= 0 and SENT in tail[finish:]:
            return
        time.sleep(0.5)
