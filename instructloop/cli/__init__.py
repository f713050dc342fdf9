"""The `instructloop` command: the face of the house.

One command with verbs that read like the task, one module per verb group, each adding its verbs
through `register(subparsers)`. The modules import nothing heavy at module level, so `instructloop
--help` is quick and `serve` never loads the training code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from instructloop.cli import cycle, evaluate, feedback, model, serve, train, up, worker

Handler = Callable[[argparse.Namespace], int | None]
# The order `instructloop --help` lists them in: the service, then data, then training.
VERB_GROUPS = (serve, up, model, feedback, cycle, worker, train, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructloop",
        description="Serve a policy over gRPC on vLLM, collect preference feedback in Redis, and "
        "improve the policy with InstructGPT's recipe (SFT, reward model, PPO-ptx).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for group in VERB_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
