"""What a caller sets up before loading weights: the engine's worker extension, the options and
the one error every call raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

WORKER_EXTENSION = "instructloop.weight_sync.worker.WeightSyncWorkerExtension"
"""Pass as `worker_extension_cls` when creating an engine whose weights will be updated."""


class WeightSyncError(RuntimeError):
    """Loading weights failed.

    `engine_consistent` is True when the engine serves the weights it served before the call (the
    checkpoint was rejected before anything changed, or the old weights were loaded back) and has
    been resumed. When False the engine's weights are unknown; it is left paused and must be
    restarted.
    """

    def __init__(self, message: str, *, engine_consistent: bool = True) -> None:
        super().__init__(message)
        self.engine_consistent = engine_consistent


@dataclass(frozen=True)
class WeightSyncConfig:
    """Options for loading weights into a running engine (defaults are what serving and PPO use).

    check_head: after loading, compare the logits head's kernel with `x @ W.T` on random inputs in
        the worker (a stale prepacked head is the known failure of in-place reloads); costs one
        small matmul.
    rollback: when loading fails half way, load the previously served checkpoint back.
    staging_dir: where `load_state_dict_sync` writes tensors for an engine whose worker is another
        process. None: /dev/shm when present (RAM, no disk I/O), else the system temp directory.
    """

    check_head: bool = True
    rollback: bool = True
    staging_dir: Path | None = field(default=None)


def engine_kwargs() -> dict[str, str]:
    """Add these to `AsyncEngineArgs(...)` / `vllm.LLM(...)` for an engine this package updates."""
    return {"worker_extension_cls": WORKER_EXTENSION}
