"""Helpers for the federated end-to-end tests: a site folder with its policy, the owner and site commands.

Every process is real (``xkt-server federate``, ``xkt-client join``), started by PID and stopped
by PID; a command ``prefix`` (``ip netns exec NS``) runs the same commands on another host.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owner_fixtures import save_signed_toy
from tls_fixtures import make_pki

from xkt.server.federation_runner import app_sha256
from xkt.shared.models import resolve_arch
from xkt.shared.render import TASK_CLASSES
from xkt.shared.signing import fingerprint, load_public_key

BIN = Path(sys.executable).parent


def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=300)
    assert completed.returncode == expect, completed.stderr + completed.stdout
    return completed


@dataclass(frozen=True)
class Federation:
    root: Path
    data: Path
    model: Path
    owner_pub: Path
    ca: Path
    cert: Path
    key: Path
    app_sha256: str


def make_federation(root: Path) -> Federation:
    """Two sites' data, a signed tiny model and a PKI: what ``xkt-server federate`` is given in the tests."""
    data = root / "data"
    run("xkt-bench", "data", "--out", str(data), "--per-class", "2", "--site-per-class", "8", "--size", "32",
        "--sites", "2", "--skew", "1", "-q")  # fmt: skip
    toy = save_signed_toy(
        root / "owner", arch=resolve_arch("resnet_tiny", {}, len(TASK_CLASSES)), class_names=TASK_CLASSES
    )
    pki = make_pki(root / "pki")
    pki.server.key_path.chmod(0o600)  # the proxy refuses a private key others can read
    return Federation(
        root=root,
        data=data,
        model=toy.model_dir,
        owner_pub=toy.owner_pub,
        ca=pki.ca.cert_path,
        cert=pki.server.cert_path,
        key=pki.server.key_path,
        app_sha256=app_sha256(),
    )


def make_site(
    fed: Federation, name: str, index: int, *, methods: tuple[str, ...] = ("shot",), app: str = "", extra: str = ""
) -> dict[str, Path]:
    """A site: its data folder with a [policy], a SuperNode key, an output folder."""
    site = fed.root / name / "site"
    shutil.copytree(fed.data / f"depth-site{index}", site)
    owner = fingerprint(load_public_key(fed.owner_pub))
    policy = (
        "\n[policy]\n"
        f"allowed_owner_keys = [{json.dumps(owner)}]\n"
        f"allowed_methods = {json.dumps(list(methods))}\n"
        f"app_sha256 = [{json.dumps(app or fed.app_sha256)}]\n"
        "max_upload_bytes = 100000000\n"
        'metrics = ["num_examples", "accuracy", "im", "mean_entropy", "train_seconds"]\n' + extra
    )
    with (site / "site.toml").open("a", encoding="utf-8") as handle:
        handle.write(policy)
    keys = fed.root / name / "keys"
    run("xkt-client", "join-key", "--out", str(keys), "-q")
    return {"site": site, "key": keys / "supernode.key", "pub": keys / "supernode.pub", "out": fed.root / name / "out"}


def read_json_line(proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    """The next stdout line of ``proc`` as JSON, with a deadline (never a bare readline)."""
    assert proc.stdout is not None
    deadline, line = time.monotonic() + timeout_s, b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no JSON line within {timeout_s} s"
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 1)
            assert chunk, "process closed stdout"
            line += chunk
    return dict(json.loads(line))


def start_federate(
    fed: Federation, sites: list[dict[str, Path]], out: Path, *extra: str, prefix: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """``xkt-server federate --json`` (stderr to OUT.log); ``prefix`` runs it elsewhere, e.g. ``ip netns exec NS``."""
    args = [*prefix, str(BIN / "xkt-server"), "federate", "--model", str(fed.model), "--owner-key", str(fed.owner_pub)]
    args += ["--out", str(out), "--tls-cert", str(fed.cert), "--tls-key", str(fed.key), "--ca-cert", str(fed.ca)]
    for site in sites:
        args += ["--site-key", str(site["pub"])]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".log").open("wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([*args, "--json", *extra], stdout=subprocess.PIPE, stderr=log)


def start_join(
    fed: Federation, site: dict[str, Path], address: str, *, prefix: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """``xkt-client join --until-finished --json`` for ``site``, in its own session (a test can kill the group)."""
    args = [*prefix, str(BIN / "xkt-client"), "join", "--superlink", address, "--site", str(site["site"])]
    args += ["--key", str(site["key"]), "--ca-cert", str(fed.ca), "--owner-key", str(fed.owner_pub)]
    args += ["--out", str(site["out"]), "--until-finished", "--timeout", "400", "--threads", "1", "--json"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop what the test started and is still running, each by its own PID: SIGTERM, SIGKILL after 20 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def finish(proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}"
    return read_json_line(proc, 5)
