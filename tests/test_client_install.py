"""The client distribution (client/) installs alone, as an application would install it: a fresh
venv, `pip install ./client` (a regular, non-editable install), and then the client and its
stubs import while torch, vLLM and the server package are nowhere to be found.

The round trip against a real server is tests/serving/test_client_library.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json
import instructloop_client
from instructloop_client import Client, RetryPolicy
from instructloop_client.v1 import completion_pb2, feedback_pb2_grpc
print(json.dumps({
    "client": instructloop_client.__file__,
    "request": completion_pb2.CompletionRequest(prompt="hi", n=2).n,
    "absent": [m for m in ("torch", "vllm", "transformers", "instructloop", "redis", "celery")
               if importlib.util.find_spec(m) is None],
}))
"""


@pytest.mark.slow
def test_the_client_installs_alone_without_torch(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    # A copy: pip builds in the source tree, and the checkout is left as it was.
    src = shutil.copytree(
        REPO / "client", tmp_path / "client",
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )  # fmt: skip
    pip = subprocess.run(
        [py, "-m", "pip", "install", "-q", str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    # Run from a directory outside the repository, so nothing of the checkout is on the path.
    out = subprocess.run(
        [py, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout)
    assert found["client"].startswith(str(venv)), found  # the installed copy, not the checkout
    assert found["request"] == 2
    assert found["absent"] == ["torch", "vllm", "transformers", "instructloop", "redis", "celery"]
    listed = subprocess.run(
        [py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    # What it pulled in: the client, grpcio and protobuf (and what those two need).
    assert {"instructloop-client", "grpcio", "protobuf"} <= names
    assert names <= {"instructloop-client", "grpcio", "protobuf", "typing-extensions", "pip",
                     "setuptools", "wheel"}, names  # fmt: skip
