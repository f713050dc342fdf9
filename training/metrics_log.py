"""A stage's per-step metrics: one JSON line per step, a progress bar, and the progress file a
training cycle reads (training/progress.py)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from instructloop.training.progress import Progress, json_default


class MetricsLog:
    """Appends one JSON object per step to a JSONL file (flushed each line, so a crashed run
    keeps its history), mirrors a few numbers on a tqdm bar, and, under a training cycle, keeps
    the latest step in the progress file ($INSTRUCTLOOP_PROGRESS_FILE)."""

    def __init__(self, path: str | Path, *, total: int, desc: str, progress: bool = True):
        from tqdm.auto import tqdm

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: TextIO = self.path.open("w", encoding="utf-8")
        self._t0 = time.time()
        self.bar = tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr)
        self.progress = Progress(desc, total)
        self.progress.update(0)

    def log(self, step: int, metrics: dict[str, Any], *, show: Sequence[str] = ()) -> None:
        row = {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
        self._f.write(json.dumps(row, default=json_default) + "\n")
        self._f.flush()
        if show:
            self.bar.set_postfix({k: _fmt(metrics[k]) for k in show if k in metrics})
        self.progress.update(step, {k: metrics[k] for k in ("epoch", *show) if k in metrics})

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        self._f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_log_path(output_dir: str, log_path: str | None) -> Path:
    """`log_path`, or `<output_dir>.metrics.jsonl` beside the checkpoint it is written for."""
    if log_path:
        return Path(log_path)
    out = Path(output_dir)
    return out.parent / f"{out.name}.metrics.jsonl"


def _fmt(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


__all__ = ["MetricsLog", "default_log_path"]
