"""`python -m benchmarks.learning`: one run, its result file and its report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import benchmarks.learning as package
from benchmarks.common import RESULTS_DIR, parse_config
from benchmarks.learning.config import LearningConfig, quick
from benchmarks.learning.report import markdown
from benchmarks.learning.run import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.learning",
        description=(package.__doc__ or "").split("\n\n")[0],
    )
    ap.add_argument("--work-dir", default="")
    ap.add_argument("--out", default=str(RESULTS_DIR / "learning.json"))
    args, cfg = parse_config(ap, argv, LearningConfig, quick)
    if cfg.eval_steps and not cfg.ppo.get("save_every"):
        # Otherwise the run trains for most of an hour and scores no step at all.
        ap.error('eval_steps=true scores the checkpoints of ppo={"save_every": N}; set N > 0')
    result = run(cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
