"""`instructloop eval`: evaluate a policy checkpoint (instructloop.training.evaluate)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from instructloop.cli.options import EXIT_USAGE, err


def _eval(args: argparse.Namespace) -> int:
    from instructloop.training.evaluate import EvalConfig, evaluate, format_table

    try:
        cfg = EvalConfig(
            policy=args.policy,
            baseline=args.baseline,
            reward_model=args.reward_model,
            n_prompts=args.n_prompts,
            prompt_seed=args.prompt_seed,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            ptx_path=args.ptx,
            device=args.device,
        )
    except ValueError as e:
        return err(str(e), EXIT_USAGE)
    report = evaluate(cfg, progress=lambda m: print(f"[eval] {m}", file=sys.stderr))
    print(format_table(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"wrote {out}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `instructloop eval`."""
    p = sub.add_parser(
        "eval",
        help="evaluate a policy: verifiable-instruction accuracy, win rate, ptx LM loss",
        description="Answer held-out constraint prompts with vLLM (greedy), score them with "
        "IFEval's checkers (prompt- and instruction-level accuracy), compute the LM loss on the "
        "held-out ptx corpus (the alignment tax) and, with --baseline, the win rate of the "
        "policy over the baseline (judged by constraints met, and by --reward-model if given). "
        "Prints a table; --out writes the full report as JSON.",
    )
    p.add_argument("--policy", required=True, help="policy checkpoint directory")
    p.add_argument("--baseline", default=None, help="a second policy to compare against")
    p.add_argument("--reward-model", default=None, help="reward-model checkpoint (a judge)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--n-prompts", type=int, default=200, help="held-out prompts (default 200)")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt draw")
    p.add_argument("--max-tokens", type=int, default=128, help="answer length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--ptx", default=None, help="held-out ptx corpus (default: the shipped one)")
    p.add_argument("--device", default="auto", help="device of the LM-loss/RM forwards")
    p.set_defaults(func=_eval)
