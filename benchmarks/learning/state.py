"""What a rerun in the same work dir reuses: `state.json` holds the samples and, per stage, its
time and settings; a stage whose settings changed is trained again."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import progress_log
from instructloop.training.checkpoint import CheckpointError, CheckpointInfo, read_checkpoint

_log = progress_log("learning")


def plain(x: Any) -> Any:
    """A config (dataclass or dict) as JSON values, for comparing with what state.json holds."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    return json.loads(json.dumps(x, default=str))


class RunState:
    """The run's phase times and its `state.json`, read back when `resume` is on and the samples
    depend on the same settings (`sampling`): a work dir holding another run's samples starts
    afresh rather than ranking them against the wrong prompts."""

    def __init__(self, work: Path, sampling: Any, *, resume: bool, t0: float) -> None:
        self.path = work / "state.json"
        self.resume, self.t0 = resume, t0
        self.phases: dict[str, float] = {}
        state: dict[str, Any] = (
            json.loads(self.path.read_text()) if resume and self.path.exists() else {}
        )
        if state and state.get("sampling") != sampling:
            _log(t0, f"{self.path} is from a run with other sampling settings: starting afresh")
            state = {}
        state["sampling"] = sampling
        self.state = state

    def save(self, **kw: Any) -> None:
        self.state.update(kw)
        self.path.write_text(json.dumps(self.state))

    def reuse(self, name: str, settings: Any, work: Path) -> CheckpointInfo | None:
        """A checkpoint a previous run of this work_dir finished with the same settings, or None."""
        if not self.resume or f"{name}_s" not in self.state.get("phases", {}):
            return None
        if self.state.get("settings", {}).get(name) != plain(settings):
            _log(self.t0, f"{name}: the previous run used other settings; training again")
            return None
        try:
            ck = read_checkpoint(work / name)
        except CheckpointError:
            return None
        _log(self.t0, f"resuming: {name} from the previous run")
        self.phases[f"{name}_s"] = self.state["phases"][f"{name}_s"]
        return ck

    def finished(self, name: str, settings: Any, started: float) -> None:
        """Record a stage this run did: its time, and the settings reuse() compares."""
        self.phases[f"{name}_s"] = time.time() - started
        self.save(
            phases=self.phases,
            settings={**self.state.get("settings", {}), name: plain(settings)},
        )
