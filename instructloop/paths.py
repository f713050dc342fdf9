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
