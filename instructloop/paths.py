"""Where instructloop keeps its files."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def data_dir() -> Path:
    """The data directory: `$INSTRUCTLOOP_DATA_DIR`, else `~/.local/share/instructloop`.

    It holds the default model (`models/`), checkpoints, exports and, under `instructloop up`,
    the private Redis server's AOF files.
    """
    env = os.environ.get("INSTRUCTLOOP_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "instructloop"


def default_model_dir() -> Path:
    """The directory `instructloop model init` writes and `instructloop serve` serves by default."""
    return data_dir() / "models" / DEFAULT_MODEL_NAME


CHECKPOINT_ROOTS_ENV = "INSTRUCTLOOP_CHECKPOINT_ROOTS"


def checkpoint_roots() -> list[Path]:
    """The directories a registered checkpoint must lie in (instructloop/registry/verify.py):
    the data directory, where `model init` and the training cycle write, plus each directory in
    `$INSTRUCTLOOP_CHECKPOINT_ROOTS` (separated by the OS path separator, ":" on Linux).

    Why roots at all: a registered version is a path every server will read. Without a bound,
    `model register` (or a symlink inside a checkpoint) could point the servers at any file on
    their machines."""
    extra = os.environ.get(CHECKPOINT_ROOTS_ENV, "").split(os.pathsep)
    roots = [data_dir(), *(Path(p) for p in extra if p.strip())]
    out: list[Path] = []
    for r in roots:
        resolved = r.expanduser().resolve()
        if resolved not in out:
            out.append(resolved)
    return out
