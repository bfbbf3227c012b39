"""Coverage-guided fuzzing (atheris / libFuzzer) of the artifact parsers: only typed errors escape.

Run it directly (``pip install atheris`` first; it is not a dependency of xkt)::

    python tests/fuzz/atheris_artifact.py -runs=100000          # or -max_total_time=600

The first input byte picks the target, the rest is its input:

0. the safetensors header check (``check_header``) against ``resnet_tiny``'s state;
1. the manifest verifier: the bytes signed by the trusted owner, then the strict
   canonical parse, the architecture and the batch-norm layer list;
2. the client's batch-norm statistics parser (``serde``), from protobuf wire bytes.

A seed corpus (a real weights file, manifest and statistics message) is written to a
temporary folder and handed to libFuzzer, so mutations start from valid files.  Any
exception other than :class:`VerificationError` (or protobuf's ``DecodeError``, which the
gRPC layer handles before ``serde`` sees anything) is a crash: libFuzzer stops, prints
the input and exits non-zero.  ``test_atheris_harness`` runs it briefly under pytest.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["xkt"]):  # only xkt: instrumenting torch takes minutes
    from google.protobuf.message import DecodeError

    from xkt.protos import source_model_pb2 as pb
    from xkt.shared.errors import VerificationError
    from xkt.shared.manifest import check_batchnorm_layers, parse_signed_manifest
    from xkt.shared.safetensors_check import check_header, expected_for
    from xkt.shared.serde import batchnorm_stats_from_proto

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_artifacts import ARCH, make_pristine  # noqa: E402

EXPECTED = expected_for(ARCH)


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="xkt-atheris-"))
    pristine = make_pristine(workdir / "model")
    owner_pub = pristine.owner_pub
    stats = pb.BatchNormStats(layers=[pb.BatchNormLayer(name="bn", running_mean=[0.0], running_var=[1.0], eps=1e-5)])
    corpus = workdir / "corpus"
    corpus.mkdir()
    assert pristine.files.weights is not None and pristine.files.manifest is not None
    for index, seed in enumerate([pristine.files.weights, pristine.files.manifest, stats.SerializeToString()]):
        (corpus / f"seed-{index}").write_bytes(bytes([index]) + seed)

    def one_input(data: bytes) -> None:
        if not data:
            return
        target, body = data[0] % 3, data[1:]
        try:
            if target == 0:
                check_header(body, len(body), EXPECTED)
            elif target == 1:
                manifest = parse_signed_manifest(body, owner_pub)
                check_batchnorm_layers(manifest, expected_for(manifest.arch))
            else:
                batchnorm_stats_from_proto(pb.BatchNormStats.FromString(body))
        except VerificationError as err:
            if not (err.reason and err.hint and err.message and "\n" not in err.message):
                raise AssertionError(f"a refusal without reason, hint or a one-line message: {err!r}") from None
        except DecodeError:
            pass

    atheris.Setup([*sys.argv, str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
