"""Run every benchmark, one after the other (each alone on the machine), as `make bench` does.

    python -m benchmarks.run_all [--only serving swap ...] [--skip learning]

Each writes benchmarks/results/<name>.json and .md; a failing one is reported and the others
still run. The learning benchmark takes up to an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = ["serving", "feedback", "swap", "cycle", "chaos", "ppo_speed", "learning"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None)
    ap.add_argument("--skip", nargs="+", choices=BENCHMARKS, default=[])
    args = ap.parse_args()
    names = [b for b in (args.only or BENCHMARKS) if b not in args.skip]
    failed = []
    for name in names:
        t0 = time.monotonic()
        print(f"== benchmarks.{name}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        print(f"== benchmarks.{name}: rc {rc}, {time.monotonic() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
