"""Steps 2 and 3 of a PPO step: the score of each rollout, and eq. 2's per-token reward.

The score is r_θ(x, y) from the reward model (bias included) or a programmatic reward,
normalised, minus a penalty when the response never reached EOS, clipped. The per-token reward
is -β·KL_t against the frozen reference at every response token, plus the score at the last one.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch

from instructloop.errors import ConfigError
from instructloop.training.config import PPOConfig
from instructloop.training.losses import kl_estimate
from instructloop.training.ppo.rollout import Rollout
from instructloop.training.reward_model.scorer import RewardScorer

RewardFn = Callable[[list[str], list[str]], list[float]]
"""A programmatic reward: (prompt texts, response texts) -> one score per response."""


def resolve_reward_fn(spec: str) -> RewardFn:
    """ "package.module:function" -> the function."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise ConfigError(f"reward_fn {spec!r} must be 'module:function'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward_fn {spec!r}: {e}") from e
    if not callable(fn):
        raise ConfigError(f"reward_fn {spec!r} is not callable")
    return fn


def choose_reward_fn(cfg: PPOConfig, reward_fn: RewardFn | None) -> RewardFn | None:
    """The programmatic reward of a run (a callable given to run_ppo wins over `cfg.reward_fn`),
    or None for the reward model; ConfigError unless exactly one reward is given."""
    if reward_fn is None and cfg.reward_fn:
        reward_fn = resolve_reward_fn(cfg.reward_fn)
    if (reward_fn is None) == (not cfg.reward_model_path):
        raise ConfigError("give exactly one reward: reward_model_path, reward_fn or a callable")
    return reward_fn


class RunningStd:
    """Running mean/variance of scores (Welford, merged per batch) for normalising a
    programmatic reward that has no stored statistics."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: list[float]) -> None:
        for x in xs:
            self.n += 1
            d = x - self.mean
            self.mean += d / self.n
            self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 1.0


def shape_scores(
    raw: list[float],
    ended_with_eos: list[bool],
    *,
    std: float,
    normalize: bool,
    missing_eos_penalty: float,
    clip: float | None,
) -> list[float]:
    """The score added at the last token: raw / std (when normalising), minus the penalty for a
    response cut off before EOS, clipped to ±clip."""
    out = []
    for r, eos in zip(raw, ended_with_eos, strict=True):
        s = r / std if normalize else r
        if not eos:
            s -= missing_eos_penalty
        if clip is not None:
            s = max(-clip, min(clip, s))
        out.append(s)
    return out


def reward_model_inputs(rollouts: list[Rollout], eos_id: int | None) -> list[list[int]]:
    """What the reward model scores: prompt + response, with an EOS appended to a response cut
    at max_new_tokens. The RM was trained (and reads its score) at the EOS closing each
    response, cut ones included (the export holds their text); a cut response's score read at
    an arbitrary last token would be off its training distribution. The missing-EOS penalty,
    not the RM, is what marks the cut."""
    tail = [] if eos_id is None else [eos_id]
    return [r.prompt_ids + r.response_ids + ([] if r.ended_with_eos else tail) for r in rollouts]


class RolloutScorer:
    """Scores rollouts with the reward model (normalised by the std stored at RM training) or a
    programmatic reward (normalised by the running std of the scores seen so far)."""

    def __init__(
        self,
        cfg: PPOConfig,
        *,
        scorer: RewardScorer | None,
        reward_fn: RewardFn | None,
        eos_id: int | None,
    ) -> None:
        self.cfg, self.scorer, self.reward_fn, self.eos_id = cfg, scorer, reward_fn, eos_id
        self.running = RunningStd()

    def __call__(
        self, prompt_texts: list[str], rollouts: list[Rollout]
    ) -> tuple[list[float], list[float]]:
        """(raw rewards, shaped scores) of `rollouts`, sampled for `prompt_texts`."""
        if self.scorer is not None:
            raw = self.scorer.score_ids(reward_model_inputs(rollouts, self.eos_id))
            std = self.scorer.std
        else:
            assert self.reward_fn is not None
            raw = [float(x) for x in self.reward_fn(prompt_texts, [r.text for r in rollouts])]
            if len(raw) != len(rollouts):
                raise ValueError(
                    f"reward_fn returned {len(raw)} scores for {len(rollouts)} responses"
                )
            self.running.update(raw)
            std = self.running.std if self.running.n > 1 else 1.0
        scores = shape_scores(
            raw,
            [r.ended_with_eos for r in rollouts],
            std=max(std, 1e-6),
            normalize=self.cfg.normalize_reward,
            missing_eos_penalty=self.cfg.missing_eos_penalty,
            clip=self.cfg.reward_clip,
        )
        return raw, scores


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward of eq. 2: r_t = -β KL_t, and r_T += score at the last real token.
    Returns (rewards `[B, R]`, per-token KL `[B, R]`)."""
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask  # type: ignore[arg-type]
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores
    return rewards, kl


__all__ = [
    "RewardFn",
    "RolloutScorer",
    "RunningStd",
    "choose_reward_fn",
    "resolve_reward_fn",
    "reward_model_inputs",
    "shape_scores",
    "token_rewards",
]
