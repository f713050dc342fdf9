"""How every stage starts and ends: `start_stage` checks the config, takes the process offline,
seeds it, picks the device, tunes the runtime and loads the tokenizer of the model it starts
from; the `Stage` it returns opens the metrics log and writes the checkpoint with the fields
every stage's manifest shares.

    stage = start_stage(cfg, data_field="train_path", model_field="model_path")
    ...train...
    with stage.metrics_log(total=n_steps, desc="sft") as log: ...
    return stage.write_checkpoint(model, name="sft", metrics=metrics)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructloop.errors import ConfigError
from instructloop.hardware import model_dtype_name
from instructloop.training.checkpoint import CheckpointInfo, write_checkpoint
from instructloop.training.config import StageConfig, config_to_dict, validate
from instructloop.training.datafiles import data_snapshot_of
from instructloop.training.metrics_log import MetricsLog, default_log_path
from instructloop.training.models import load_tokenizer, resolve_model_path
from instructloop.training.runtime import offline_hub, prepare_runtime, resolve_device, set_seed

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Stage:
    """A started stage: its config, device, the model it starts from, and that model's tokenizer."""

    cfg: StageConfig
    device: torch.device
    model_path: str
    """The resolved directory of the model the stage starts from (the manifest's parent)."""
    tokenizer: PreTrainedTokenizerBase
    data_path: str
    """The stage's data file; its export manifest names the data snapshot."""

    @property
    def log_path(self) -> Path:
        return default_log_path(self.cfg.output_dir, self.cfg.log_path)

    def metrics_log(self, *, total: int, desc: str) -> MetricsLog:
        """The per-step log, opened only once training begins, so a run refused earlier leaves
        no file behind."""
        return MetricsLog(self.log_path, total=total, desc=desc, progress=self.cfg.progress)

    def write_checkpoint(
        self,
        model: Any,
        *,
        name: str,
        metrics: dict[str, Any],
        out: str | None = None,
        extra: dict[str, Any] | None = None,
        config_updates: dict[str, Any] | None = None,
    ) -> CheckpointInfo:
        """`model` with this stage's tokenizer and manifest at `out` (default: `output_dir`).
        An intermediate checkpoint (`out` elsewhere) always replaces an older one."""
        cfg = self.cfg
        out = out or cfg.output_dir
        return write_checkpoint(
            out,
            model=model,
            tokenizer=self.tokenizer,
            stage=name,
            config=config_to_dict(cfg),
            metrics=metrics,
            parent_path=self.model_path,
            parent_version=cfg.parent_version,
            data_snapshot=cfg.data_snapshot or data_snapshot_of(self.data_path),
            save_dtype=(
                cfg.save_dtype if cfg.save_dtype != "auto" else model_dtype_name(self.model_path)
            ),
            extra=extra,
            extra_files={"metrics.jsonl": self.log_path},
            config_updates=config_updates,
            overwrite=cfg.overwrite or out != cfg.output_dir,
        )


def check_stage_config(cfg: StageConfig, data_field: str) -> None:
    """The checks that need nothing loaded: the config's ranges, a data file and an output
    directory given, and no checkpoint already there unless `overwrite`. Raises ConfigError."""
    validate(cfg)
    if not cfg.output_dir or not getattr(cfg, data_field):
        raise ConfigError(f"output_dir and {data_field} are required")
    if Path(cfg.output_dir).exists() and not cfg.overwrite:
        raise ConfigError(f"{cfg.output_dir} exists (set overwrite=true to replace it)")


def start_stage(cfg: StageConfig, *, data_field: str, model_field: str) -> Stage:
    """Check `cfg` (`check_stage_config`), then set the process up for training: offline model
    loading, seeds, the device, runtime tuning, and the tokenizer of the model named by
    `model_field` ("" = the default policy)."""
    check_stage_config(cfg, data_field)
    offline_hub()  # before transformers is first imported (load_tokenizer)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    prepare_runtime(cfg, device)
    model_path = resolve_model_path(getattr(cfg, model_field))
    return Stage(
        cfg=cfg,
        device=device,
        model_path=model_path,
        tokenizer=load_tokenizer(model_path),
        data_path=getattr(cfg, data_field),
    )


__all__ = ["Stage", "check_stage_config", "start_stage"]
