"""A site's Flower SuperNode, started the way the site wants it: its key, its data paths, its guard.

``xkt-client join`` runs this.  The SuperNode dials out to the owner's fleet proxy with TLS
and authenticates with the site's own P-384 key (Flower's node authentication accepts NIST
EC keys only; the owner registers the public half).  Nothing listens on the site's network:
the SuperNode's local Runtime API is bound to 127.0.0.1.

Two things make the run the site's and not the owner's:

* the **node config** (site folder, output folder, the owner public key the site trusts)
  comes from the site's command line, never from the owner;
* a private ``bin/flwr-clientapp`` first on the SuperNode's ``PATH`` runs the site's guard
  (:mod:`xkt.client.flower_guard`), which refuses any app bundle the site did not pin.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from xkt.client.federated_client import NODE_FILE
from xkt.client.flower_guard import SITE_ENV
from xkt.shared.errors import ConfigError
from xkt.shared.files import replace_file
from xkt.shared.flower_process import die_with_parent, flower_env, free_port

KEY_FILE, PUBLIC_FILE = "supernode.key", "supernode.pub"


def create_node_key(folder: Path) -> tuple[Path, Path]:
    """A P-384 key pair in OpenSSH form: ``supernode.key`` (0600) and ``supernode.pub`` (for the owner)."""
    private_path, public_path = folder / KEY_FILE, folder / PUBLIC_FILE
    if private_path.exists():
        raise ConfigError(
            f"{private_path} already exists", hint="keep using it, or move it away first", reason="key-exists"
        )
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    replace_file(private_path, private, mode=0o600)
    replace_file(public_path, public + b"\n")
    return private_path, public_path


@dataclass(frozen=True)
class JoinConfig:
    """Everything ``xkt-client join`` decides for the site."""

    superlink: str  # host:port of the owner's fleet proxy
    site: Path
    out: Path
    key: Path  # the SuperNode's private key (OpenSSH, P-384)
    ca_cert: Path  # the owner's CA (the proxy's certificate chains to it)
    owner_key: Path  # the owner's Ed25519 public key: the source model must be signed with it
    runtime_port: int = 0  # the local Runtime API on 127.0.0.1; 0: a free port
    max_retries: int = 0  # 0: keep retrying the SuperLink (a restarted owner is found again)
    threads: int = 0

    @property
    def home(self) -> Path:
        return self.out / ".flwr"

    def node_config(self) -> str:
        """Flower's ``--node-config`` string (TOML values): the paths only the site decides."""
        values = {
            "site": str(self.site.resolve()),
            "out": str(self.out.resolve()),
            "owner-key": str(self.owner_key.resolve()),
            "site-key": str((self.out / "site-key" / "owner.key").resolve()),
        }
        parts = [f"{name}={_toml_string(value)}" for name, value in values.items()]
        return " ".join([*parts, f"threads={self.threads}"])


def _toml_string(value: str) -> str:
    if "'" in value or "\n" in value:
        raise ConfigError(f"path {value!r} contains a quote or newline", hint="use a plain path")
    return f"'{value}'"


def guard_bin(out: Path) -> Path:
    """``OUT/.flwr/bin/flwr-clientapp``: Flower's app runner behind the site's pin (see flower_guard)."""
    folder = out / ".flwr" / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "flwr-clientapp"
    text = f'#!/bin/sh\nexec "{sys.executable}" -m xkt.client.flower_guard "$@"\n'
    replace_file(script, text.encode("utf-8"), mode=0o755)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def supernode_command(cfg: JoinConfig, runtime_port: int) -> list[str]:
    args = ["flower-supernode", "--superlink", cfg.superlink, "--root-certificates", str(cfg.ca_cert)]
    args += ["--auth-supernode-private-key", str(cfg.key), "--node-config", cfg.node_config()]
    args += ["--host", "127.0.0.1", "--port", str(runtime_port)]
    return args + (["--max-retries", str(cfg.max_retries)] if cfg.max_retries else [])


def start_supernode(cfg: JoinConfig, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start the SuperNode in its own session (so it and its app processes stop together)."""
    for path, what in ((cfg.site, "site folder"), (cfg.key, "SuperNode key"), (cfg.ca_cert, "CA certificate")):
        if not path.exists():
            raise ConfigError(f"{what} {path} does not exist", hint="check the path", reason="missing-file")
    if not cfg.owner_key.is_file():
        raise ConfigError(f"owner key {cfg.owner_key} does not exist", hint="ask the owner for owner.pub")
    cfg.out.mkdir(parents=True, exist_ok=True)
    bin_dir = guard_bin(cfg.out)
    env = flower_env(cfg.home, {SITE_ENV: str(cfg.site.resolve())})
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])  # the guard's flwr-clientapp comes first
    sink = (log or cfg.out / "supernode.log").open("ab")
    try:
        return subprocess.Popen(
            supernode_command(cfg, cfg.runtime_port or free_port()),
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,  # a SIGKILLed join does not leave its SuperNode dialling on
        )
    finally:
        sink.close()


def known_node_id(out: Path) -> int | None:
    """The node id an earlier round recorded, or None."""
    try:
        return int(json.loads((out / NODE_FILE).read_text(encoding="utf-8"))["node_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def release_stale_session(cfg: JoinConfig, node_id: int) -> bool:
    """Tell the SuperLink that this site's previous SuperNode is gone; True if it accepted.

    A SuperNode that was killed never says goodbye, and Flower refuses to activate the
    same key again until the old session misses two heartbeats (about a minute).  The
    request is Flower's own ``deactivate-node``, signed with the site's key like every
    Fleet call, so only the key's owner can end its session.
    """
    import httpx
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key = serialization.load_ssh_private_key(cfg.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return False
    interceptors: list[Any] = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(key, key.public_key()),
    ]
    client = FleetHttpClient.from_server_address(cfg.superlink, False, str(cfg.ca_cert), interceptors)
    try:
        client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
        return True
    except (httpx.HTTPError, RuntimeError, ValueError):
        return False
    finally:
        client.close()
