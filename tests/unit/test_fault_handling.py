"""Regressions for the faults tests/integration/test_faults.py found, checkable without root.

* A resumed download waited for nothing: after a network cut each retry hit the dead
  channel at once, so ``--attempts 3`` was spent in milliseconds.  ``_download_resuming``
  now waits for the channel (``SourceModelClient.wait_ready``) before every retry.
* A full disk was an "internal error" (exit 1): the fetch cache, the adapt checkpoints
  (safetensors raises its own error type, with no errno) and the adapt output now fail
  with ``disk-full`` (exit 3), and a half-written checkpoint file is removed.

The real thing (a cut veth link, a tiny tmpfs) runs in test_faults.py as root.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import SafetensorError

import xkt.client.trainer as trainer
from xkt.client.fetch import RECONNECT_WAIT_S, _download, _download_resuming
from xkt.protos import source_model_pb2 as pb
from xkt.shared.errors import ConfigError, TransportError
from xkt.shared.training import Checkpoints

DATA = bytes(range(256)) * 64  # 16 KiB of weights
CHUNK = 4096


def _chunks(offset: int) -> Iterator[pb.WeightsChunk]:
    for start in range(offset, len(DATA), CHUNK):
        data = DATA[start : start + CHUNK]
        yield pb.WeightsChunk(offset=start, data=data, sha256=hashlib.sha256(data).hexdigest())


class CutOnce:
    """A client whose first stream breaks after one chunk, as when a link is cut; it logs what it is asked."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.opts = SimpleNamespace(server="owner:1")

    def fetch_weights(self, sha256: str, offset: int) -> Iterator[pb.WeightsChunk]:
        self.calls.append(f"fetch {offset}")
        for index, chunk in enumerate(_chunks(offset)):
            if not offset and index == 1:
                raise TransportError("went away", hint="resume", reason="stream-interrupted")
            yield chunk

    def wait_ready(self, timeout_s: float) -> bool:
        self.calls.append(f"wait {timeout_s:.0f}")
        return True


MANIFEST: Any = SimpleNamespace(weights=SimpleNamespace(size=len(DATA), sha256=hashlib.sha256(DATA).hexdigest()))


def test_a_resume_waits_for_the_connection_before_it_retries(tmp_path: Path) -> None:
    part, client = tmp_path / "w.part", CutOnce()
    _download_resuming(client, MANIFEST, part, None, attempts=3)  # type: ignore[arg-type]
    assert client.calls == ["fetch 0", f"wait {RECONNECT_WAIT_S:.0f}", f"fetch {CHUNK}"]
    assert part.read_bytes() == DATA


def test_a_full_disk_while_downloading_is_disk_full_and_keeps_the_bytes_held(tmp_path: Path) -> None:
    part = tmp_path / "cache" / "sha.part" / "w.part"
    part.parent.mkdir(parents=True)

    def disk_fills(done: int, total: int) -> None:  # called after each chunk is written, inside the write loop
        raise OSError(errno.ENOSPC, "No space left on device")

    client = SimpleNamespace(fetch_weights=lambda sha, offset: _chunks(offset))
    with pytest.raises(ConfigError) as info:
        _download(client, MANIFEST, part, disk_fills)  # type: ignore[arg-type]
    assert info.value.reason == "disk-full" and "no space left" in info.value.message
    assert part.read_bytes() == DATA[:CHUNK]  # kept: the next fetch resumes from here


@pytest.mark.parametrize("error", ["enospc", "safetensors"])
def test_a_full_disk_while_checkpointing_is_disk_full_and_leaves_no_half_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    checkpoints = Checkpoints(tmp_path / "ckpt")

    def half_written(self: Checkpoints, state: dict[str, Any], last: Any, best: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"last-{state['epoch']:04d}.safetensors").write_bytes(b"half")
        if error == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error")

    monkeypatch.setattr(Checkpoints, "save", half_written)
    monkeypatch.setattr(trainer.shutil, "disk_usage", lambda folder: SimpleNamespace(free=0))
    tensors = {"w": torch.zeros(4)}
    with pytest.raises(ConfigError) as info:
        trainer._save_checkpoint(checkpoints, {"epoch": 2}, tensors, tensors)
    assert info.value.reason == "disk-full" and "epoch-2 checkpoint" in info.value.message
    assert list(checkpoints.folder.iterdir()) == []


def test_another_checkpoint_error_is_not_called_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Checkpoints, state: dict[str, Any], last: Any, best: Any) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Checkpoints, "save", broken)
    with pytest.raises(PermissionError):
        trainer._save_checkpoint(Checkpoints(tmp_path), {"epoch": 1}, {}, None)
