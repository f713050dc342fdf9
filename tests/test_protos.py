"""The committed gRPC stubs match the .proto files (run `make protos` after editing protos/)."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    protos = sorted((REPO / "protos" / "instructloop" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'protos'}",
            f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
            *map(str, protos),
        ],
        check=True,
    )  # fmt: skip
    generated = sorted((tmp_path / "instructloop" / "v1").iterdir())
    assert len(generated) == 3 * len(protos)
    for fresh in generated:
        committed = REPO / "instructloop" / "v1" / fresh.name
        assert committed.exists(), f"{committed} missing: run `make protos`"
        assert filecmp.cmp(fresh, committed, shallow=False), f"{fresh.name} stale: `make protos`"


def test_package_is_instructloop_v1() -> None:
    from instructloop.v1 import completion_pb2, feedback_pb2, model_pb2

    for mod in (completion_pb2, feedback_pb2, model_pb2):
        assert mod.DESCRIPTOR.package == "instructloop.v1"
    names = {s.name for s in completion_pb2.DESCRIPTOR.services_by_name.values()}
    assert names == {"CompletionService"}
    assert set(feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].methods_by_name) == {
        "SubmitComparison", "SubmitRanking", "SubmitRating",
    }  # fmt: skip
