"""Regenerate the committed Python code for the wire contract: ``python protos/regen.py``.

The ``.proto`` source lives at ``protos/xkt/v1/source_model.proto`` (its path mirrors its
proto package, so the descriptor name ``xkt/v1/source_model.proto`` is unique in any
process), while the generated modules sit flat in ``protos/`` and import as
``xkt.protos.source_model_pb2``: one Python package, no empty ``xkt/v1`` packages.

protoc names modules after the proto path (``xkt.v1.source_model_pb2``), so the
generated import and module name are rewritten to ``xkt.protos`` by exact string
replacement: the output depends only on the ``.proto`` file and the grpcio-tools
version, so a second run is byte-identical and ``tests/unit/test_protos.py`` can fail
on any drift.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("xkt/v1/source_model.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_PROTOC_PACKAGE = "xkt.v1"
_PYTHON_PACKAGE = "xkt.protos"


def generated_names() -> list[str]:
    """File names regen writes into the output folder, in a stable order."""
    stems = [Path(name).stem for name in PROTO_FILES]
    return [stem + suffix for stem in stems for suffix in GENERATED_SUFFIXES]


def _fix_imports(text: str, stem: str) -> str:
    """Point protoc's ``xkt.v1`` module paths (only those: service names stay ``xkt.v1``) at ``xkt.protos``."""
    return text.replace(
        f"from {_PROTOC_PACKAGE} import {stem}_pb2", f"from {_PYTHON_PACKAGE} import {stem}_pb2"
    ).replace(f"'{_PROTOC_PACKAGE}.{stem}_pb2'", f"'{_PYTHON_PACKAGE}.{stem}_pb2'")


def regenerate(out_dir: Path) -> list[Path]:
    """Run protoc on :data:`PROTO_FILES` and write the fixed modules into ``out_dir``."""
    from grpc_tools import protoc  # a dev dependency: only regeneration needs it

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTOS_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTO_FILES,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(PROTO_FILES)}")
        for proto in PROTO_FILES:
            stem = Path(proto).with_suffix("")
            for suffix in GENERATED_SUFFIXES:
                source = Path(tmp) / (str(stem) + suffix)
                target = out_dir / (stem.name + suffix)
                target.write_text(_fix_imports(source.read_text(encoding="utf-8"), stem.name), encoding="utf-8")
                written.append(target)
    return written


def main() -> int:
    """Regenerate into ``protos/`` and list the files written."""
    for path in regenerate(PROTOS_DIR):
        print(path.relative_to(PROTOS_DIR.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
