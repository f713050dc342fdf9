"""`instructloop` verbs of the training component (see instructloop/cli.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this component's verbs to the top-level parser."""
    from training import eval_cli, loop_cli

    loop_cli.register(sub)  # worker, beat, cycle run/cancel/status, model register
    eval_cli.register(sub)  # eval
