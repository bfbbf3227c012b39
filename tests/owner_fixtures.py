"""The owner's side of a test: a signed toy artifact, keys, a PKI, a token, and a real server.

Shared by the integration tests (and the method-speed unit test) so that each only says
what differs: the architecture, the class names, the image size.  Import it the way the
tests import ``tls_fixtures`` (``tests/`` put on ``sys.path`` by the test file).

``serve_subprocess`` starts a real ``xkt-server serve`` on 127.0.0.1 port 0, waits for its
one-line JSON announcement with ``select()`` and a deadline (never a bare ``readline``
that could hang the run), and on exit stops it with SIGTERM, SIGKILL only after a
timeout, always by its own PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from tls_fixtures import Pki, make_pki

from xkt.server.auth import add_token
from xkt.server.serving import ServeConfig
from xkt.shared.artifact import InputSpec, Manifest, save_artifact
from xkt.shared.models import ArchSpec, build_model
from xkt.shared.signing import generate_keypair, load_private_key

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class SignedToy:
    """A signed artifact in ``model_dir`` and the owner key pair that signed it."""

    model_dir: Path
    owner_key: Path
    owner_pub: Path
    manifest: Manifest


def save_signed_toy(
    root: Path,
    *,
    arch: ArchSpec,
    class_names: Sequence[str],
    size: int = 32,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
    model_id: str = "toy",
    provenance: dict[str, Any] | None = None,
) -> SignedToy:
    """``root/keys/owner.{key,pub}`` and an untrained ``arch`` (seed 0), signed into ``root/model``."""
    key, pub = generate_keypair(root / "keys")
    torch.manual_seed(0)
    manifest = save_artifact(
        build_model(arch).eval(),
        out_dir=root / "model",
        private_key=load_private_key(key),
        model_id=model_id,
        model_version="1",
        arch=arch,
        class_names=list(class_names),
        input_spec=InputSpec("rgb", 3, size, tuple(mean), tuple(std)),
        provenance={"trainer": "test"} if provenance is None else provenance,
    )
    return SignedToy(root / "model", key, pub, manifest)


@dataclass(frozen=True)
class OwnerFiles:
    """Everything an owner hands a server, and a site its client, as files under ``root``."""

    root: Path
    model_dir: Path
    owner_pub: Path
    other_pub: Path  # a key that signed nothing: the wrong owner key
    pki: Pki  # private keys 0600: the client refuses keys others can read
    tokens: Path  # the server's token file
    token: str  # the site's token
    token_file: Path  # the same token for the client, 0600
    sha256: str  # of weights.safetensors, read from disk (and equal to the signed manifest's)
    size: int

    @property
    def tls_flags(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.pki.server.cert_path), "--tls-key", str(self.pki.server.key_path))

    def serve_config(self, **changes: object) -> ServeConfig:
        """An in-process server config: TLS with the PKI's server certificate, tokens, 0.5 s grace."""
        base = ServeConfig(
            model_dir=self.model_dir,
            owner_key=self.owner_pub,
            tls_cert=self.pki.server.cert_path,
            tls_key=self.pki.server.key_path,
            tokens=self.tokens,
            grace_s=0.5,
        )
        return replace(base, **changes)  # type: ignore[arg-type]


def make_owner(
    root: Path, *, arch: ArchSpec, class_names: Sequence[str], site: str = "site-a", **artifact: Any
) -> OwnerFiles:
    """A signed toy artifact, a second (wrong) owner key, a PKI and a token for ``site``, under ``root``.

    ``artifact``: the rest of :func:`save_signed_toy`'s options (``size``, ``mean``, ``std``, ``provenance``).
    """
    toy = save_signed_toy(root, arch=arch, class_names=class_names, **artifact)
    _other_key, other_pub = generate_keypair(root / "other")
    pki = make_pki(root / "pki")
    for path in (root / "pki").glob("*.key"):
        path.chmod(0o600)  # the client refuses private keys others can read
    token = add_token(root / "tokens.txt", site)
    token_file = root / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)  # the client refuses a token file others can read
    weights = (toy.model_dir / "weights.safetensors").read_bytes()
    sha256 = hashlib.sha256(weights).hexdigest()
    assert (toy.manifest.weights.sha256, toy.manifest.weights.size) == (sha256, len(weights))
    return OwnerFiles(
        root, toy.model_dir, toy.owner_pub, other_pub, pki, root / "tokens.txt", token, token_file, sha256, len(weights)
    )


# ------------------------------------------------------------------ a real `xkt-server serve`


@dataclass(frozen=True)
class ServedProcess:
    proc: subprocess.Popen[bytes]
    port: int
    announced: dict[str, Any]  # the server's JSON announcement


def _read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    """The first line on the server's stdout, or what came before EOF or ``timeout_s``."""
    assert proc.stdout is not None
    fd, got = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in got:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        got += chunk
    return got.split(b"\n", 1)[0]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Last resort: SIGKILL our own server by its PID, and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def serve_subprocess(
    owner: OwnerFiles,
    *flags: str,
    grace_s: float = 0.5,
    stderr_to: Path | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
    stop_timeout_s: float = STOP_TIMEOUT_S,
    expect_exit: int | None = 0,
) -> Iterator[ServedProcess]:
    """``xkt-server serve`` of ``owner``'s model on 127.0.0.1 port 0: ``--tokens``, ``--json``, ``--grace``, ``flags``.

    Yields once the server announced ``"ok": true`` (fails the test after ``start_timeout_s``
    otherwise).  When the block ends with the server still running it gets SIGTERM and
    ``stop_timeout_s`` to exit; then SIGKILL, and the test fails.  If the block ended
    normally and ``expect_exit`` is not None, the exit code of that SIGTERM is asserted.  A
    server that already exited inside the block (the test stopped it) is only reaped.
    ``stderr_to`` keeps the server's stderr in a file (its folder is created), for messages.
    """
    args = [str(BIN / "xkt-server"), "serve", "--model", str(owner.model_dir), "--owner-key", str(owner.owner_pub)]
    args += ["--listen", "127.0.0.1:0", "--tokens", str(owner.tokens), "--json"]
    args += ["--grace", str(grace_s), *flags]
    if stderr_to is not None:
        stderr_to.parent.mkdir(parents=True, exist_ok=True)
        with stderr_to.open("wb") as err:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err)
    else:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    signalled = False
    try:
        line = _read_line(proc, start_timeout_s)
        try:
            announced = json.loads(line) if line else {}
        except json.JSONDecodeError:
            announced = {}
        if not isinstance(announced, dict) or announced.get("ok") is not True:
            _kill(proc)
            err_tail = stderr_to.read_text(errors="replace")[-2000:] if stderr_to is not None else ""
            pytest.fail(f"xkt-server serve announced no ok within {start_timeout_s} s: {line!r} {err_tail}")
        yield ServedProcess(proc, int(announced["port"]), announced)
        if proc.poll() is None:
            signalled = True
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=stop_timeout_s)  # TimeoutExpired fails the test; `finally` kills it
            if expect_exit is not None:
                assert code == expect_exit, f"xkt-server serve exited {code} on SIGTERM, not {expect_exit}"
    except BaseException:
        if proc.poll() is None and not signalled:  # the block failed: still a graceful stop first
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=stop_timeout_s)
        raise
    finally:
        _kill(proc)
        if proc.stdout is not None:
            proc.stdout.close()


# ------------------------------------------------------------------ a plaintext TCP proxy in front of a server


class LoopbackProxy:
    """A TCP proxy on 127.0.0.1 (``port``) to ``target_port``; ``client_sent`` sees every byte the client sends."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def client_sent(self, data: bytes) -> None:
        """Called from a pipe thread with each block the client sends; subclasses keep or count it."""

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self._target), timeout=10)
            for args in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(target=self._pipe, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pipe(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        try:
            while data := src.recv(65536):
                if outbound:
                    self.client_sent(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def drain(self) -> None:
        """Wait for every connection so far to close, so what ``client_sent`` saw is complete."""
        for thread in list(self._threads):
            thread.join(timeout=5)
            assert not thread.is_alive(), "a proxied connection did not close"

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(timeout=2)
        self._listener.close()
