"""`run_ppo(cfg)`: the PPO-ptx loop, one PPO step per batch of prompts.

Each step collects experience (rollout, score, per-token rewards, advantages: experience.py),
stops early if the KL to the reference blew up, updates the actor and the critic (update.py),
and loads the actor's new weights into the running vLLM engine, so the next rollout is sampled
from the policy just trained.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from instructloop.errors import ConfigError
from instructloop.training.checkpoint import CheckpointInfo
from instructloop.training.config import PPOConfig
from instructloop.training.optim import adamw, warmup_constant_schedule
from instructloop.training.ppo.batch import causal_lm_parts
from instructloop.training.ppo.data import (
    PromptSampler,
    PtxBatch,
    load_prompts,
    load_ptx,
    ptx_batches,
)
from instructloop.training.ppo.experience import collect_experience
from instructloop.training.ppo.models import PPOModels, load_models, policy_state_dict
from instructloop.training.ppo.rewards import RewardFn, RolloutScorer, choose_reward_fn
from instructloop.training.ppo.rollout import RolloutEngine
from instructloop.training.ppo.update import ppo_update
from instructloop.training.runtime import autocast
from instructloop.training.stage import Stage, check_stage_config, start_stage
from instructloop.training.trunk import lower_hidden


def run_ppo(
    cfg: PPOConfig,
    reward_fn: RewardFn | None = None,
    *,
    engine: RolloutEngine | None = None,
) -> CheckpointInfo:
    """Train the policy with PPO-ptx; write the final actor to `cfg.output_dir`.

    `reward_fn` overrides `cfg.reward_fn`/`cfg.reward_model_path` with a callable. `engine`: a
    running RolloutEngine of the same architecture to reuse (tests; it gets the actor's weights
    first); by default one is started and stopped here.
    """
    check_stage_config(cfg, "prompts_path")  # a bad config fails before the reward is imported
    reward_fn = choose_reward_fn(cfg, reward_fn)
    stage = start_stage(cfg, data_field="prompts_path", model_field="policy_path")
    tok = stage.tokenizer

    # Data first: a bad file fails before any model is loaded.
    prompts = load_prompts(cfg.prompts_path, tok, cfg.max_prompt_length)
    ptx_seqs = None
    if cfg.gamma_ptx > 0:
        assert cfg.ptx_path is not None  # validate() checked
        ptx_seqs = load_ptx(cfg.ptx_path, tok, cfg.ptx_max_length)
    models = load_models(cfg, stage.device, stage.model_path)
    ptx = None if ptx_seqs is None else ptx_stream(ptx_seqs, models, stage, cfg)
    if models.scorer is not None and models.scorer.tokenizer.get_vocab() != tok.get_vocab():
        raise ConfigError("the reward model's tokenizer differs from the policy's")
    trainable = [p for p in models.actor.parameters() if p.requires_grad]
    critic_params = [p for p in models.critic.parameters() if p.requires_grad]
    opt = adamw(
        [{"params": trainable, "lr": cfg.lr}, {"params": critic_params, "lr": cfg.critic_lr}],
        betas=cfg.adam_betas,
        weight_decay=cfg.weight_decay,
    )
    run = PPORun(
        cfg=cfg,
        stage=stage,
        models=models,
        prompts=PromptSampler(prompts, cfg.seed),
        score=RolloutScorer(
            cfg, scorer=models.scorer, reward_fn=reward_fn, eos_id=tok.eos_token_id
        ),
        optimizer=opt,
        # Constant LR after a linear warm-up (paper: 10 iterations), counted in PPO steps.
        schedule=warmup_constant_schedule(opt, cfg.warmup_steps),
        ptx=ptx,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    with rollout_engine(run, engine) as eng:
        out = train(run, eng)
    metrics = {
        **out.last,
        "steps": len(out.history),
        "first_reward": out.history[0]["reward"] if out.history else float("nan"),
        "final_reward": out.history[-1]["reward"] if out.history else float("nan"),
    }
    return save_policy(run, metrics, out.stop, out=cfg.output_dir, weights=out.ema)


@dataclass
class PPORun:
    """What every PPO step uses, set up once by `run_ppo`."""

    cfg: PPOConfig
    stage: Stage
    models: PPOModels
    prompts: PromptSampler
    score: RolloutScorer
    optimizer: torch.optim.Optimizer
    schedule: Any
    ptx: Iterator[PtxBatch] | None
    generator: torch.Generator


@dataclass
class Outcome:
    """What the loop leaves: the last step's numbers, the reward and KL of every step, why it
    stopped early (None: it ran every step), and the EMA weights when it keeps them."""

    last: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    stop: dict[str, Any] | None = None
    ema: dict[str, torch.Tensor] | None = None


def train(run: PPORun, engine: RolloutEngine) -> Outcome:
    """The PPO steps, until `total_episodes` rollouts or a guard stops the run."""
    cfg, models = run.cfg, run.models
    n_steps = cfg.total_episodes // cfg.batch_size
    out = Outcome()
    if cfg.ema_decay:
        out.ema = {k: v.detach().clone() for k, v in policy_state_dict(models.actor).items()}
    nan_streak = 0
    with run.stage.metrics_log(total=n_steps, desc="ppo") as mlog:
        for step in range(1, n_steps + 1):
            # 1-4. rollout, scores, per-token rewards, advantages
            exp = collect_experience(
                engine, run.prompts, run.score, models, cfg,
                pad_id=run.stage.tokenizer.pad_token_id, device=run.stage.device,
            )  # fmt: skip
            row: dict[str, Any] = {
                **exp.stats,
                "lr": run.schedule.get_last_lr()[0],
                "rollout_seconds": exp.rollout_seconds,
            }
            # Guard: a KL blow-up against the reference ends the run before more damage.
            if cfg.kl_stop is not None and not (exp.batch.stats["kl_k3"] <= cfg.kl_stop):
                out.stop = {"reason": "kl", "step": step, "kl_k3": exp.batch.stats["kl_k3"]}
                mlog.log(step, {**row, "early_stop": "kl"})
                break

            # 5. PPO (+ ptx) update
            t1 = time.perf_counter()
            upd = ppo_update(
                models.actor, models.critic, run.optimizer, exp.batch, cfg,
                ptx_batches=run.ptx, generator=run.generator, device=run.stage.device,
            )  # fmt: skip
            run.schedule.step()
            row.update(upd, update_seconds=time.perf_counter() - t1)
            nan_streak = nan_streak + 1 if upd["skipped_minibatches"] else 0

            # 6. the rollout engine gets the new weights
            weights = policy_state_dict(models.actor)
            row["sync_seconds"] = engine.load_state_dict(weights)
            if out.ema is not None:  # θ_ema <- d·θ_ema + (1 - d)·θ
                for k, v in weights.items():
                    out.ema[k].lerp_(v.detach(), 1.0 - float(cfg.ema_decay or 0.0))
            mlog.log(step, row, show=("reward", "kl", "response_length"))
            mlog.advance()
            out.last = {k: float(v) for k, v in row.items() if isinstance(v, int | float)}
            out.history.append({k: out.last[k] for k in ("reward", "kl") if k in out.last})
            if nan_streak >= cfg.max_nan_skips:
                out.stop = {"reason": "nan", "step": step}
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < n_steps:
                out_dir = f"{cfg.output_dir}.step{step}"
                save_policy(run, out.last, out.stop, out=out_dir, weights=out.ema)
    return out


def ptx_stream(
    seqs: list[list[int]], models: PPOModels, stage: Stage, cfg: PPOConfig
) -> Iterator[PtxBatch]:
    """The ptx batches of the run, with their own seed; with a frozen actor trunk, each batch
    carries the trunk's output (cached across draws)."""
    trunk_fn = None
    if models.split.actor:
        actor_body = causal_lm_parts(models.actor)[0]

        def trunk_fn(ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
            with autocast(stage.device, cfg.mixed_precision):
                return lower_hidden(actor_body, ids, attn, models.split.actor)

    return ptx_batches(
        seqs, stage.tokenizer.pad_token_id, cfg.ptx_batch_size, cfg.seed + 1, stage.device,
        trunk=trunk_fn, n_frozen=models.split.actor, cache_bytes=cfg.ptx_trunk_cache_mib << 20,
    )  # fmt: skip


@contextlib.contextmanager
def rollout_engine(run: PPORun, engine: RolloutEngine | None) -> Iterator[RolloutEngine]:
    """The engine rollouts are sampled from: `engine` when given (it gets the actor's weights
    first, as it may hold others), else one started on the policy here and stopped at the end."""
    if engine is not None:
        engine.load_state_dict(policy_state_dict(run.models.actor))
        yield engine
        return
    cfg = run.cfg
    own = RolloutEngine(
        run.stage.model_path,
        dtype=cfg.vllm_dtype,
        max_model_len=cfg.vllm_max_model_len or (cfg.max_prompt_length + cfg.max_new_tokens),
        seed=cfg.seed,
        kv_cache_gib=cfg.vllm_kv_cache_gib,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
    )
    try:
        yield own
    finally:
        own.close()


def save_policy(
    run: PPORun,
    metrics: dict[str, Any],
    stop: dict[str, Any] | None,
    *,
    out: str,
    weights: dict[str, torch.Tensor] | None = None,
) -> CheckpointInfo:
    """The actor as a checkpoint at `out`: `weights` (the EMA) when given, LoRA merged into a
    plain model, and the early stop and the reward source in the manifest."""
    cfg, actor = run.cfg, run.models.actor
    model = actor
    if weights is None and hasattr(actor, "get_base_model"):
        weights = policy_state_dict(actor)  # LoRA merged
    if weights is not None:
        # A plain copy for saving (EMA or merged LoRA); training (save_every) goes on as it was.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(run.stage.model_path, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"saving the policy: missing {missing}, unexpected {unexpected}")
    reward = {"reward_model_path": cfg.reward_model_path, "reward_fn": cfg.reward_fn}
    return run.stage.write_checkpoint(
        model, name="ppo", metrics=metrics, out=out, extra={"early_stop": stop, "reward": reward}
    )


__all__ = ["PPORun", "run_ppo", "save_policy"]
