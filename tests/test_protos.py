"""The committed gRPC stubs match the .proto files (run `make protos` after editing protos/).

They live in the client distribution (client/instructloop_client/v1, scripts/gen_protos.py says
why); `instructloop.v1` is the same modules under their first import path."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STUBS = REPO / "client" / "instructloop_client" / "v1"


def test_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    protos = sorted((REPO / "protos" / "instructloop" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = sorted(tmp_path.iterdir())
    assert len(generated) == 3 * len(protos)
    for fresh in generated:
        committed = STUBS / fresh.name
        assert committed.exists(), f"{committed} missing: run `make protos`"
        assert filecmp.cmp(fresh, committed, shallow=False), f"{fresh.name} stale: `make protos`"
    # Nothing generated is left at the old place: instructloop.v1 only re-exports the client's.
    old = {p.name for p in (REPO / "instructloop" / "v1").glob("*.py*")}
    assert old == {"__init__.py"}, f"stale stubs in instructloop/v1: {old}"


def test_package_is_instructloop_v1() -> None:
    from instructloop.v1 import completion_pb2, feedback_pb2, model_pb2

    for mod in (completion_pb2, feedback_pb2, model_pb2):
        assert mod.DESCRIPTOR.package == "instructloop.v1"
        # The proto's path is the contract's (reflection, grpcurl); only Python names moved.
        assert mod.DESCRIPTOR.name.startswith("instructloop/v1/")
    names = {s.name for s in completion_pb2.DESCRIPTOR.services_by_name.values()}
    assert names == {"CompletionService"}
    assert set(feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].methods_by_name) == {
        "SubmitComparison", "SubmitRanking", "SubmitRating",
    }  # fmt: skip


def test_both_import_paths_give_the_same_modules() -> None:
    import instructloop_client.v1.feedback_pb2 as client_pb2
    import instructloop_client.v1.feedback_pb2_grpc as client_grpc

    import instructloop.v1.feedback_pb2_grpc as via_submodule
    from instructloop.v1 import feedback_pb2

    assert via_submodule is client_grpc and feedback_pb2 is client_pb2
    assert isinstance(client_pb2.FeedbackAck(), feedback_pb2.FeedbackAck)
