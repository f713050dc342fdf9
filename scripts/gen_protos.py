"""Generate the gRPC stubs from protos/ into the client distribution (`make protos`).

The stubs are part of `instructloop-client` (client/), as `instructloop_client.v1`, so that an
application installs them without the server's dependencies; the server imports them through
`instructloop.v1`, which re-exports the same modules. protoc names a Python module after the
.proto's path (`instructloop/v1/x.proto` -> `instructloop.v1.x_pb2`), and that path is part of
the public contract (reflection, grpcurl, other languages' imports), so it stays; instead the
generated Python import lines and module names are rewritten to the client's package. The
serialised descriptors are left alone: the wire format and the proto package
(`instructloop.v1`) do not change.

    python scripts/gen_protos.py [--out DIR]   # default: client/instructloop_client/v1
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOS = REPO / "protos"
OUT = REPO / "client" / "instructloop_client" / "v1"
PACKAGE = "instructloop_client.v1"

# Only these spots name the Python package; each pattern is anchored so that nothing inside a
# serialised descriptor (bytes that also spell instructloop/v1 and instructloop.v1) can match.
_REWRITES = [
    (re.compile(r"^from instructloop\.v1 import ", re.M), f"from {PACKAGE} import "),
    (
        re.compile(r"(_builder\.BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')instructloop\.v1\."),
        rf"\g<1>{PACKAGE}.",
    ),
    (re.compile(r"(generated code in )instructloop/v1/"), r"\g<1>instructloop_client/v1/"),
]


def rewrite(text: str) -> str:
    for pattern, repl in _REWRITES:
        text = pattern.sub(repl, text)
    return text


def generate(out: Path) -> list[Path]:
    """Write the stubs of every protos/instructloop/v1/*.proto into `out`; returns the files."""
    protos = sorted((PROTOS / "instructloop" / "v1").glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTOS}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}",
                f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--pyi_out={tmp}",
                *map(str, protos),
            ],
            check=True,
        )  # fmt: skip
        for src in sorted((Path(tmp) / "instructloop" / "v1").iterdir()):
            dst = out / src.name
            dst.write_text(rewrite(src.read_text()))
            written.append(dst)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    for f in generate(args.out):
        print(f.relative_to(REPO) if f.is_relative_to(REPO) else f)


if __name__ == "__main__":
    main()
