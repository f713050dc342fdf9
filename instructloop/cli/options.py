"""What the verb groups share: messages, exit codes, the Redis options and the loop's settings.

Light by contract, like every module of the face: heavy imports stay inside the handlers, so
`instructloop --help` is quick and `serve` never loads the training code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3


def say(msg: str) -> None:
    """A progress line of a long-running verb (`serve`, `up`), on stderr."""
    print(f"[instructloop] {msg}", file=sys.stderr, flush=True)


def err(msg: str, code: int = EXIT_FAILED) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def add_redis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis-url",
        default=None,
        help="Redis for broker, results and loop state (default: $REDIS_URL, else the running "
        "`instructloop up`'s, else redis://127.0.0.1:6379/0)",
    )
    p.add_argument("--prefix", default=None, help="Redis key prefix (default: il:)")


def loop_env(args: argparse.Namespace) -> dict[str, str]:
    """The loop's settings from the flags; with no Redis named (flag or $REDIS_URL), the running
    `instructloop up`'s Redis and key prefix (instructloop/running.py)."""
    from instructloop.running import read_running

    env: dict[str, str] = {}
    if getattr(args, "redis_url", None):
        env["REDIS_URL"] = args.redis_url
    elif not os.environ.get("REDIS_URL"):
        loop = read_running()
        if loop is not None:
            env["REDIS_URL"] = loop.redis_url
            if not os.environ.get("INSTRUCTLOOP_KEY_PREFIX"):
                env["INSTRUCTLOOP_KEY_PREFIX"] = loop.key_prefix
    if getattr(args, "prefix", None):
        env["INSTRUCTLOOP_KEY_PREFIX"] = args.prefix
    return env


def loop_config(args: argparse.Namespace) -> Any:
    """The LoopConfig these flags, the environment and a running `up` describe."""
    from instructloop.training.loop.config import LoopConfig

    env = dict(os.environ)
    env.update(loop_env(args))
    return LoopConfig.from_env(env)
