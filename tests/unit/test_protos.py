"""The committed generated code is exactly what ``protos/regen.py`` produces today.

Like Flower's ``check-protos.sh``: regenerate into a temporary folder and fail on any
byte of difference, so nobody hand-edits ``*_pb2*`` files or forgets to regenerate after
changing the ``.proto``.  The wire contract's privacy rule (no request field can carry
site data) is checked on the descriptors.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from xkt.protos import regen, source_model_pb2


def test_committed_code_matches_regeneration(tmp_path: Path) -> None:
    regen.regenerate(tmp_path)
    for name in regen.generated_names():
        committed = (regen.PROTOS_DIR / name).read_bytes()
        assert (tmp_path / name).read_bytes() == committed, f"{name} is stale: run `python protos/regen.py`"


def test_generated_code_imports_under_xkt_protos() -> None:
    grpc_module = (regen.PROTOS_DIR / "source_model_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from xkt.protos import source_model_pb2" in grpc_module
    assert "'/xkt.v1.SourceModel/FetchWeights'" in grpc_module  # the wire name stays xkt.v1
    assert "add_registered_method_handlers('xkt.v1.SourceModel'" in grpc_module
    assert source_model_pb2.Manifest.__module__ == "xkt.protos.source_model_pb2"


def test_requests_carry_only_digests_and_offsets() -> None:
    """No message a site sends has a bytes field or a nested message: nothing can carry data."""
    service = source_model_pb2.DESCRIPTOR.services_by_name["SourceModel"]
    for method in service.methods:
        for field in method.input_type.fields:
            assert field.type not in (FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE), (
                f"{method.name} request field {field.name} could carry site data"
            )
            assert not field.is_repeated, f"{method.name}.{field.name} is repeated"
