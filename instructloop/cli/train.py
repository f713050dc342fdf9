"""`instructloop train sft | rm | ppo`: one InstructGPT stage on exported data.

    instructloop train sft --config sft.toml --set epochs=2 --set output_dir=/tmp/sft
    instructloop train rm  --config rm.json
    instructloop train ppo --config ppo.toml --set gamma_ptx=0
    instructloop train ppo --show-config          # every field with its default

Each verb builds the stage's config dataclass from the file (JSON or TOML) plus `--set key=value`
overrides (values parse as JSON when they can: numbers, true/false, null, lists) and calls the
same function a Celery worker or a test calls: run_sft / run_reward_model / run_ppo. Heavy
imports happen inside the handler, so `instructloop --help` stays quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAGES = {
    "sft": (
        "SFTConfig",
        "instructloop.training.sft",
        "run_sft",
        "supervised fine-tuning on demonstrations",
    ),
    "rm": (
        "RewardModelConfig",
        "instructloop.training.reward_model",
        "run_reward_model",
        "reward model on K-way rankings (InstructGPT eq. 1)",
    ),
    "ppo": (
        "PPOConfig",
        "instructloop.training.ppo",
        "run_ppo",
        "PPO-ptx against a reward model (eq. 2)",
    ),
}


def _train(args: argparse.Namespace) -> int:
    import dataclasses
    import importlib

    from instructloop.training import config as config_mod

    cls_name, module, func_name, _ = STAGES[args.stage]
    cls = getattr(config_mod, cls_name)
    if args.show_config:
        cfg = cls()
        print(json.dumps(config_mod.config_to_dict(cfg), indent=1))
        return 0
    try:
        cfg = config_mod.load_config(cls, args.config, args.set)
    except config_mod.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = getattr(importlib.import_module(module), func_name)
    from instructloop.training.checkpoint import CheckpointError
    from instructloop.training.datafiles import DataError

    try:
        info = run(cfg)
    except (config_mod.ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {
        "checkpoint": str(info.path),
        "stage": info.stage,
        "metrics": info.metrics,
        "config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
    }
    print(json.dumps(summary, indent=1, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    train = sub.add_parser(
        "train",
        help="run a training stage: sft, rm (reward model) or ppo (PPO-ptx)",
        description="Run one InstructGPT stage on exported data and write a checkpoint "
        "(Hugging Face safetensors + manifest.json, written atomically).",
    )
    tsub = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, (_cls, _mod, _fn, help_text) in STAGES.items():
        p = tsub.add_parser(
            stage,
            help=help_text,
            description=f"{help_text}. Config fields: see --show-config and training/config.py.",
        )
        p.add_argument("--config", type=Path, default=None, help="JSON or TOML file of fields")
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            default=[],
            help="override a field (repeatable); VALUE is JSON when it parses, else a string",
        )
        p.add_argument(
            "--show-config", action="store_true", help="print every field's default and exit"
        )
        p.set_defaults(func=_train)
