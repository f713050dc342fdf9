"""A stage's progress, where a training cycle can read it.

The cycle (instructloop.training.loop) sets $INSTRUCTLOOP_PROGRESS_FILE for each stage it runs; the
stage keeps its latest step there and the cycle copies it into its record for `status` and
`cycle run --wait`. Torch-free, so the loop can import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

PROGRESS_FILE_ENV = "INSTRUCTLOOP_PROGRESS_FILE"
"""Set by the training cycle for a stage it runs: the stage's MetricsLog
keeps its latest step there, which the cycle copies into its record for `status`."""
PROGRESS_EVERY_S = 2.0


class Progress:
    """Keeps a stage's latest step in the progress file ($INSTRUCTLOOP_PROGRESS_FILE), at most
    every PROGRESS_EVERY_S and always at the last step; nothing where no cycle asked for it."""

    def __init__(self, stage: str, total: int) -> None:
        env = os.environ.get(PROGRESS_FILE_ENV)
        self.path = Path(env) if env else None
        self.stage, self.total = stage, total
        self._t0 = self._at = time.time()

    def update(self, step: int, figures: dict[str, Any] | None = None) -> None:
        if self.path is None:
            return
        now = time.time()
        if now - self._at < PROGRESS_EVERY_S and 0 < step < self.total:
            return
        self._at = now
        doc = {
            "stage": self.stage,
            "step": step,
            "total": self.total,
            "elapsed_s": round(now - self._t0, 1),
            **{k: json_default(v) for k, v in (figures or {}).items()},
        }
        tmp = self.path.with_suffix(".tmp")
        with contextlib.suppress(OSError):  # progress is a courtesy; training goes on
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.path)


def json_default(v: Any) -> Any:
    """A figure as JSON can hold it: a number where it is one (tensors, numpy), else its text."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)
