"""`python -m benchmarks.online_learning`: one run, its result file and its report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import benchmarks.online_learning as package
from benchmarks.common import RESULTS_DIR, parse_config
from benchmarks.online_learning.config import OnlineLearningConfig, quick
from benchmarks.online_learning.report import markdown
from benchmarks.online_learning.run import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.online_learning",
        description=(package.__doc__ or "").split("\n\n")[0],
        epilog="Fields (key=JSON value): "
        + ", ".join(f.name for f in dataclasses.fields(OnlineLearningConfig)),
    )
    ap.add_argument("--work-dir", default="", help="logs and the fresh data directory")
    ap.add_argument("--out", default=str(RESULTS_DIR / "online_learning.json"))
    args, cfg = parse_config(ap, argv, OnlineLearningConfig, quick)
    result = run(cfg)
    result["quick"] = args.quick
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"written: {out}")
    return 1 if result["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
