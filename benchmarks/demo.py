"""The demo behind ``make demo``: the product's own commands, run in order, on built-in data.

It runs exactly what a newcomer would type (each command is printed first), on loopback:

1. ``xkt-bench data``: the built-in RGB / depth / infrared benchmark;
2. ``xkt-server keys init`` and ``xkt-server train``: the owner's signed RGB model;
3. ``xkt-server provision``: a throw-away dev CA, a server certificate for 127.0.0.1
   and a site kit (mutual TLS, the product's default stance);
4. ``xkt-server serve`` in the background, on a free loopback port;
5. ``xkt-client adapt --server 127.0.0.1:PORT`` for the depth site, once per method;
6. a table of source-only against adapted accuracy on the site's labelled eval images,
   then the server is stopped (SIGTERM, graceful).

Everything lives in ``WORK/PROFILE`` and is reused by the next run (data, keys, model,
PKI); adapted runs are redone each time.  Two profiles: ``quick`` (the default, a small
model and data set that fit ``make demo`` into a few minutes on 2 cores) and ``full``
(today's benchmark defaults: ResNet-18 on 18,000 owner images, ~15 min to train).
"""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from xkt.shared.errors import XktError
from xkt.shared.log import stderr_console

SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 30.0
SITE_ID = "depth-site"
DEFAULT_DEMO_METHODS = ("shot", "socket")


@dataclass(frozen=True)
class Profile:
    """How big the demo's data and models are."""

    name: str
    per_class: int  # owner training images per class
    site_per_class: int  # unlabelled target images per class at each site
    train_args: tuple[str, ...]  # architecture and schedule for `xkt-server train`
    adapt_epochs: int | None  # None: the method's default
    size: int = 64  # image side in pixels


PROFILES = {
    "quick": Profile(
        name="quick",
        per_class=1000,
        site_per_class=200,
        train_args=("--arch", "resnet_tiny", "--set", 'model.kwargs={width=32, stem="imagenet"}', "--epochs", "16"),
        adapt_epochs=5,
    ),
    "full": Profile(
        name="full", per_class=3000, site_per_class=300, train_args=("--arch", "resnet18"), adapt_epochs=None
    ),
}


def _command(name: str) -> str:
    """The console script installed beside this interpreter (the venv's own xkt-* commands)."""
    return str(Path(sys.executable).parent / name)


def _shown(args: list[str]) -> str:
    return shlex.join([Path(args[0]).name, *args[1:]])


def _run(args: list[str], *, capture: bool = False) -> str:
    console = stderr_console()
    console.print(f"$ {_shown(args)}", style="bold", markup=False)
    completed = subprocess.run(args, stdout=subprocess.PIPE if capture else None, text=True, check=False)
    if completed.returncode != 0:
        raise XktError(
            f"`{_shown(args)}` failed with exit code {completed.returncode}",
            hint="see its error line above",
            reason="demo-step-failed",
        )
    return completed.stdout or ""


def _json(args: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_run(args, capture=True))
    return result


# ------------------------------------------------------------------ the owner's side


def _owner(work: Path, profile: Profile) -> dict[str, Any]:
    """Data, keys and the trained source model (each reused when already there)."""
    data, keys, model = work / "data", work / "keys", work / "model"
    if not (data / "dataset.json").exists():
        args = ["data", "--kind", "shapes", "--out", str(data), "--seed", "0", "--force", "--size", str(profile.size)]
        args += ["--per-class", str(profile.per_class), "--site-per-class", str(profile.site_per_class)]
        _run([_command("xkt-bench"), *args])
    if not (keys / "owner.key").exists():
        _run([_command("xkt-server"), "keys", "init", "--out", str(keys)])
    if (model / "manifest.json").exists():
        stderr_console().print(f"reusing the trained model in {model} (delete it to retrain)")
        return {}
    args = ["train", "--data", str(data), "--key", str(keys / "owner.key"), "--out", str(model)]
    return _json([_command("xkt-server"), *args, *profile.train_args, "--resume", "--json"])


def _pki(work: Path) -> Path:
    """A throw-away dev CA, the server certificate (127.0.0.1) and the depth site's kit."""
    pki = work / "pki"
    if not (pki / "ca.crt").exists():
        _run([_command("xkt-server"), "provision", "init", "--out", str(pki), "--ca-name", "xkt demo CA (dev only)"])
    kit = pki / "sites" / SITE_ID
    if not kit.exists():
        _run([_command("xkt-server"), "provision", "add-site", SITE_ID, "--pki", str(pki)])
    return pki


@contextmanager
def _serving(work: Path, pki: Path) -> Iterator[int]:
    """``xkt-server serve`` with mutual TLS on a free loopback port; SIGTERM and wait on exit."""
    args = [_command("xkt-server"), "serve", "--model", str(work / "model")]
    args += ["--owner-key", str(work / "keys" / "owner.pub"), "--listen", "127.0.0.1:0"]
    args += ["--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key")]
    args += ["--client-ca", str(pki / "ca.crt"), "--pki", str(pki), "--audit-log", str(work / "audit.jsonl")]
    stderr_console().print(f"$ {_shown([*args, '--json'])} &", style="bold", markup=False)
    server = subprocess.Popen([*args, "--json"], stdout=subprocess.PIPE, text=True)
    try:
        yield _announced_port(server)
    finally:
        _stop(server)


def _announced_port(server: subprocess.Popen[str]) -> int:
    """The port from the server's one-line JSON announcement (bounded wait)."""
    assert server.stdout is not None
    ready, _, _ = select.select([server.stdout], [], [], SERVER_START_TIMEOUT_S)
    line = server.stdout.readline() if ready else ""
    if not line:
        raise XktError(
            f"xkt-server serve did not start within {SERVER_START_TIMEOUT_S:.0f} s",
            hint="see its error line above",
            reason="demo-step-failed",
        )
    port = int(json.loads(line)["port"])
    stderr_console().print(f"serving on 127.0.0.1:{port} (mutual TLS)")
    return port


def _stop(server: subprocess.Popen[str]) -> None:
    """Graceful stop: SIGTERM, then wait; a server that does not stop is killed (it is ours)."""
    if server.poll() is None:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    stderr_console().print(f"server stopped (exit code {server.returncode})")


# ------------------------------------------------------------------- the site's side


def _adapt(work: Path, pki: Path, port: int, method: str, profile: Profile) -> dict[str, Any]:
    """``xkt-client adapt`` for the depth site over mutual TLS; its --json result."""
    out = work / "runs" / method
    args = [_command("xkt-client"), "adapt", "--server", f"127.0.0.1:{port}", "--kit", str(pki / "sites" / SITE_ID)]
    args += ["--owner-key", str(work / "keys" / "owner.pub"), "--site", str(work / "data" / "depth")]
    args += ["--method", method, "--out", str(out), "--cache", str(work / "cache"), "--overwrite", "--json"]
    args += ["--epochs", str(profile.adapt_epochs)] if profile.adapt_epochs else []
    return _json(args)


def run_demo(work: Path, profile: Profile, methods: tuple[str, ...] = DEFAULT_DEMO_METHODS) -> dict[str, Any]:
    """The whole loopback story; returns the accuracies and timings it printed."""
    chosen = profile
    work = work / profile.name  # a profile's data and model are never mixed with another's
    started = time.perf_counter()
    training = _owner(work, chosen)
    pki = _pki(work)
    rgb = _json(
        [_command("xkt-client"), "evaluate", "--model", str(work / "model"), "--site", str(work / "data" / "rgb")]
        + ["--owner-key", str(work / "keys" / "owner.pub"), "--json", "--quiet"]
    )
    with _serving(work, pki) as port:
        runs = {method: _adapt(work, pki, port, method, chosen) for method in methods}
    result = {
        "profile": profile.name,
        "rgb_accuracy": rgb["accuracy"],
        "depth_source_only": next(iter(runs.values()))["accuracy_before"],
        "depth_adapted": {method: run["accuracy_after"] for method, run in runs.items()},
        "adapt_seconds": {method: run["seconds"] for method, run in runs.items()},
        "training_seconds": training.get("seconds"),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    _print_table(result)
    return result


def _print_table(result: dict[str, Any]) -> None:
    source_only = result["depth_source_only"]
    table = Table("model", "eval set", "accuracy", "vs source-only", title="xkt demo: adapting to the depth site")
    table.add_row("owner's RGB model", "RGB (its own modality)", f"{100 * result['rgb_accuracy']:.1f} %", "")
    table.add_row("owner's RGB model (source-only)", "depth", f"{100 * source_only:.1f} %", "")
    for method, accuracy in result["depth_adapted"].items():
        gain = f"{100 * (accuracy - source_only):+.1f} pts"
        table.add_row(f"adapted at the site ({method})", "depth", f"{100 * accuracy:.1f} %", gain)
    console = stderr_console()
    console.print(table)
    if result["training_seconds"]:
        console.print(f"source training took {result['training_seconds']:.0f} s")
    console.print(f"demo took {result['total_seconds']:.0f} s; the server is stopped")
