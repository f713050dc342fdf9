"""Stage 3 of InstructGPT: PPO-ptx (§3.5, App. C.3-C.4), eq. 2:

    objective(φ) = E_(x,y)~π_φ [ r_θ(x, y) - β log(π_φ(y|x) / π_SFT(y|x)) ]
                 + γ_ptx E_x~D_pretrain [ log π_φ(x) ]

`run_ppo(cfg)` is the whole loop, one PPO step per batch of prompts:

1. rollout: sample one response per prompt from the current policy on vLLM (`RolloutEngine`);
2. score: r_θ(x, y) from the reward model (or a programmatic `reward_fn`), normalised, clipped,
   minus a penalty when the response never reached EOS;
3. per-token reward: -β·KL_t against the frozen SFT reference at every response token, plus the
   score at the last one (the EOS when there is one);
4. advantages: GAE with γ = 1 on the critic's per-token values (the critic starts from the RM),
   whitened over the batch;
5. update (`ppo_update`): clipped policy ratio + clipped value loss per minibatch; then, when
   γ_ptx > 0, the ptx loss on a pretraining batch is backpropagated in a second, consecutive
   step into the same gradient buffers before the optimizer step (App. C.4);
6. sync: the actor's new weights go into the running vLLM engine, so the next rollout is
   sampled from the policy just trained;
7. log, and stop early if the KL to the reference blows up or losses turn non-finite.

Shapes: `[B, R]` tensors are per response token, left-aligned (row b's response starts at
column 0), padded on the right, with `mask` marking real tokens.
"""

from __future__ import annotations

import importlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructloop.training.checkpoint import CheckpointInfo, save_state_dict, write_checkpoint
from instructloop.training.common import (
    DataError,
    MetricsLog,
    adamw,
    autocast,
    data_snapshot_of,
    default_log_path,
    load_tokenizer,
    model_dtype_name,
    pad_batch,
    prepare_runtime,
    prompt_text_of,
    read_jsonl,
    resolve_device,
    resolve_model_path,
    set_seed,
    train_model_kwargs,
)
from instructloop.training.config import ConfigError, PPOConfig, config_to_dict, validate
from instructloop.training.losses import (
    entropy_from_logprobs,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ptx_loss,
    value_loss,
)
from instructloop.training.reward_model import backbone_and_head, token_scores
from instructloop.training.trunk import (
    freeze_lower,
    lower_hidden,
    pad_hidden,
    same_trunk,
    upper_hidden,
)

if TYPE_CHECKING:
    import torch
    from instructloop.training.rollout import Rollout, RolloutEngine

RewardFn = Callable[[list[str], list[str]], list[float]]
"""A programmatic reward: (prompt texts, response texts) -> one score per response."""


# ---------------------------------------------------------------------------------------------
# Batch layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrunkSplit:
    """How many bottom layers of the actor and the critic are frozen (`trainable_layers`), and
    which models share the actor's frozen trunk: the reference when it is the policy's starting
    point (the trunk never trains, so its output is the reference's too), the critic when its
    trunk holds the same weights (a reward model trained with the same trainable_layers)."""

    actor: int = 0
    critic: int = 0
    reference_shares_actor: bool = False
    critic_shares_actor: bool = False

    @property
    def active(self) -> bool:
        return self.actor > 0 or self.critic > 0


@dataclass
class RolloutBatch:
    """One PPO step's experience. `input_ids`/`attention_mask` are `[B, T]` prompt + response
    (right-padded); the rest is `[B, R]` per response token, or `[B]` per sequence."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    query_lens: torch.Tensor  # [B]
    response_ids: torch.Tensor  # [B, R]
    mask: torch.Tensor  # [B, R] float
    logprobs: torch.Tensor  # π_old(y_t), at rollout time
    ref_logprobs: torch.Tensor  # π_SFT(y_t)
    values: torch.Tensor  # V_old(s_t)
    rewards: torch.Tensor  # -β KL_t, + score at the last token
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # [B] the score added at the end (normalised, penalised, clipped)
    stats: dict[str, float] = field(default_factory=dict)
    # With `trainable_layers`: the frozen trunks' outputs `[B, T, H]`, computed once per rollout
    # and reused by every pass over it (training/trunk.py); None when the whole model trains.
    actor_lower: torch.Tensor | None = None
    critic_lower: torch.Tensor | None = None
    trunk: TrunkSplit = field(default_factory=TrunkSplit)

    def select(self, idx: torch.Tensor) -> RolloutBatch:
        """The rows `idx`, trimmed to the longest sequence among them."""
        t = int(self.attention_mask[idx].sum(1).max())
        r = int(self.mask[idx].sum(1).max())
        return RolloutBatch(
            input_ids=self.input_ids[idx, :t],
            attention_mask=self.attention_mask[idx, :t],
            query_lens=self.query_lens[idx],
            response_ids=self.response_ids[idx, :r],
            mask=self.mask[idx, :r],
            logprobs=self.logprobs[idx, :r],
            ref_logprobs=self.ref_logprobs[idx, :r],
            values=self.values[idx, :r],
            rewards=self.rewards[idx, :r],
            advantages=self.advantages[idx, :r],
            returns=self.returns[idx, :r],
            scores=self.scores[idx],
            actor_lower=None if self.actor_lower is None else self.actor_lower[idx, :t],
            critic_lower=None if self.critic_lower is None else self.critic_lower[idx, :t],
            trunk=self.trunk,
        )


def response_positions(query_lens: torch.Tensor, r: int, t: int) -> torch.Tensor:
    """`[B, R]` index of the position whose output predicts response token j: the logits (and
    value) at query_len - 1 + j score token query_len + j. Clamped into range for padding."""
    import torch

    j = torch.arange(r, device=query_lens.device)
    return (query_lens[:, None] - 1 + j[None, :]).clamp(max=t - 1)


def gather_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x `[B, T, ...]` at positions `[B, R]` -> `[B, R, ...]`."""
    if x.dim() == 2:
        return x.gather(1, pos)
    idx = pos[..., None].expand(-1, -1, x.shape[-1])
    return x.gather(1, idx)


def causal_lm_parts(model: Any) -> tuple[Any, Any]:
    """(transformer body, LM head) of a causal LM, also through a peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


def policy_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float,
    *,
    with_entropy: bool = False,
    lower: torch.Tensor | None = None,
    n_frozen: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t | x, y_<t) of the response tokens `[B, R]` (and the entropy of π at each).

    The LM head (hidden x 49k vocabulary for SmolLM2, the largest matmul of a small model) runs
    only at the response positions, not over the prompt. π is the distribution vLLM sampled
    from: softmax(logits / temperature). `lower`: the frozen trunk's output for this batch, so
    only the `n_frozen`-and-up layers run.
    """
    import torch
    import torch.nn.functional as F

    body, head = causal_lm_parts(model)
    if lower is not None:
        hidden = upper_hidden(body, lower, batch.attention_mask, n_frozen)
    else:
        hidden = body(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
    pos = response_positions(batch.query_lens, batch.mask.shape[1], hidden.shape[1])
    logits = head(gather_positions(hidden, pos)).float()
    if temperature != 1.0:  # a [B, R, vocab] pass saved in the usual case
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    ent = None
    if with_entropy:  # a metric: from the same log-softmax, outside the autograd graph
        with torch.no_grad():
            ent = entropy_from_logprobs(logp_all)
    return logp, ent


def critic_values(critic: Any, batch: RolloutBatch) -> torch.Tensor:
    """V(s_t) `[B, R]`: the value head at the position before each response token."""
    v = token_scores(
        critic,
        batch.input_ids,
        batch.attention_mask,
        lower=batch.critic_lower,
        n_frozen=batch.trunk.critic,
    )
    pos = response_positions(batch.query_lens, batch.mask.shape[1], v.shape[1])
    return gather_positions(v, pos)


# ---------------------------------------------------------------------------------------------
# Scores and per-token rewards
# ---------------------------------------------------------------------------------------------


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
    import torch

    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask  # type: ignore[arg-type]
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores
    return rewards, kl


# ---------------------------------------------------------------------------------------------
# One PPO update (steps 5 of the loop), separate so tests can drive it on a fixed batch
# ---------------------------------------------------------------------------------------------


def ppo_update(
    actor: Any,
    critic: Any,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    cfg: PPOConfig,
    *,
    ptx_batches: Iterator[PtxBatch] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """`cfg.ppo_epochs` passes over `batch` in shuffled minibatches. For each minibatch:
    PPO loss -> backward; then (γ_ptx > 0) γ_ptx · ptx loss on the next pretraining batch ->
    backward into the same buffers (InstructGPT App. C.4: "computed in consecutive steps and
    accumulated"); clip; one optimizer step. A minibatch whose loss or gradient is not finite is
    skipped (its gradients dropped). Returns mean metrics over the minibatches."""
    import torch

    dev = device or batch.input_ids.device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    n_mb = skipped = 0
    b = batch.input_ids.shape[0]
    actor.train()
    critic.train()
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(b, generator=generator)
        for i in range(0, b, cfg.minibatch_size):
            mb = batch.select(perm[i : i + cfg.minibatch_size].to(dev))
            with autocast(dev, cfg.mixed_precision):
                logp, ent = policy_logprobs(
                    actor,
                    mb,
                    cfg.temperature,
                    with_entropy=True,
                    lower=mb.actor_lower,
                    n_frozen=mb.trunk.actor,
                )
                values = critic_values(critic, mb)
            pg_loss, clipfrac = ppo_policy_loss(
                logp, mb.logprobs, mb.advantages, mb.mask, cfg.cliprange
            )
            vf_loss, vf_clipfrac = value_loss(
                values, mb.values, mb.returns, mb.mask, cfg.cliprange_value
            )
            loss = pg_loss + cfg.vf_coef * vf_loss
            ok = bool(torch.isfinite(loss))
            if ok:
                loss.backward()
            ptx_value = 0.0
            if ok and cfg.gamma_ptx > 0 and ptx_batches is not None:
                # Eq. 2's second term, as its own backward pass into the same .grad buffers.
                ptx_b = next(ptx_batches)
                with autocast(dev, cfg.mixed_precision):
                    logits = ptx_logits(actor, ptx_b)
                lp = ptx_loss(logits, ptx_b.input_ids, ptx_b.attention_mask)
                ok = bool(torch.isfinite(lp))
                if ok:
                    (cfg.gamma_ptx * lp).backward()
                    ptx_value = lp.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if ok else None
            if ok and grad_norm is not None and torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                approx_kl = masked_mean(0.5 * (logp - mb.logprobs) ** 2, mb.mask).item()
                ratio = masked_mean(torch.exp(logp - mb.logprobs), mb.mask).item()
            row = {
                "policy_loss": pg_loss.item(),
                "value_loss": vf_loss.item(),
                "ptx_loss": ptx_value,
                "clip_fraction": clipfrac.item(),
                "value_clip_fraction": vf_clipfrac.item(),
                "entropy": masked_mean(ent, mb.mask).item() if ent is not None else 0.0,
                "approx_kl": approx_kl,
                "ratio": ratio,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            }
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v
            n_mb += 1
    out = {k: v / max(n_mb, 1) for k, v in sums.items()}
    out["skipped_minibatches"] = float(skipped)
    out["minibatches"] = float(n_mb)
    return out


# ---------------------------------------------------------------------------------------------
# Experience: rollouts -> RolloutBatch (steps 2-4)
# ---------------------------------------------------------------------------------------------


def make_batch(
    rollouts: list[Rollout],
    scores: list[float],
    *,
    actor: Any,
    reference: Any,
    critic: Any,
    cfg: PPOConfig,
    pad_id: int,
    device: torch.device,
    trunk: TrunkSplit | None = None,
) -> RolloutBatch:
    """Log-probs of the sampled tokens under the actor (π_old) and the reference, the critic's
    values, per-token rewards, GAE advantages (whitened) and returns. With a `trunk` split, the
    frozen trunks run here once and their outputs stay in the batch for the update."""
    import torch

    seqs = [r.prompt_ids + r.response_ids for r in rollouts]
    ids, attn = pad_batch(seqs, pad_id, device)
    qlens = torch.tensor([len(r.prompt_ids) for r in rollouts], device=device)
    rmax = max(len(r.response_ids) for r in rollouts)
    resp = torch.full((len(rollouts), rmax), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rollouts), rmax), device=device)
    for i, r in enumerate(rollouts):
        resp[i, : len(r.response_ids)] = torch.tensor(r.response_ids, device=device)
        mask[i, : len(r.response_ids)] = 1.0
    zero = torch.zeros_like(mask)  # filled in below
    batch = RolloutBatch(
        input_ids=ids, attention_mask=attn, query_lens=qlens, response_ids=resp, mask=mask,
        logprobs=zero, ref_logprobs=zero, values=zero, rewards=zero, advantages=zero,
        returns=zero, scores=torch.tensor(scores, device=device, dtype=torch.float32),
        trunk=trunk or TrunkSplit(),
    )  # fmt: skip
    actor.eval()
    critic.eval()
    split = batch.trunk
    with torch.no_grad(), autocast(device, cfg.mixed_precision):
        if split.active:
            batch.actor_lower = lower_hidden(causal_lm_parts(actor)[0], ids, attn, split.actor)
            batch.critic_lower = (
                batch.actor_lower
                if split.critic_shares_actor
                else lower_hidden(backbone_and_head(critic)[0], ids, attn, split.critic)
            )
        batch.logprobs, _ = policy_logprobs(
            actor, batch, cfg.temperature, lower=batch.actor_lower, n_frozen=split.actor
        )
        if reference is None:  # LoRA on the reference: the actor without its adapters
            with actor.disable_adapter():
                batch.ref_logprobs, _ = policy_logprobs(actor, batch, cfg.temperature)
        elif split.reference_shares_actor:  # the same frozen trunk: only its top layers run
            batch.ref_logprobs, _ = policy_logprobs(
                reference, batch, cfg.temperature, lower=batch.actor_lower, n_frozen=split.actor
            )
        else:
            batch.ref_logprobs, _ = policy_logprobs(reference, batch, cfg.temperature)
        batch.values = critic_values(critic, batch).float() * mask
    batch.logprobs = batch.logprobs.float() * mask
    batch.ref_logprobs = batch.ref_logprobs.float() * mask
    batch.rewards, kl = token_rewards(
        batch.scores, batch.logprobs, batch.ref_logprobs, mask, cfg.kl_coef, cfg.kl_estimator
    )
    adv, batch.returns = gae(batch.rewards, batch.values, mask, cfg.gamma, cfg.lam)
    batch.advantages = masked_whiten(adv, mask) if cfg.whiten_advantages else adv

    def seq_kl(estimator: str) -> float:  # mean over sequences of the per-token sum
        k = kl_estimate(batch.logprobs, batch.ref_logprobs, estimator)  # type: ignore[arg-type]
        return (k * mask).sum(1).mean().item()

    batch.stats = {
        "kl": (kl.sum(1)).mean().item(),  # the estimator used in the reward
        "kl_k1": seq_kl("k1"),
        "kl_k3": seq_kl("k3"),
        "nonscore_reward": (-cfg.kl_coef * kl).sum(1).mean().item(),
        "value_mean": masked_mean(batch.values, mask).item(),
        "advantage_mean_raw": masked_mean(adv, mask).item(),
    }
    return batch


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_prompts(path: str, tokenizer: Any, max_prompt_length: int) -> list[tuple[str, list[int]]]:
    """(prompt text, token ids cut from the left to max_prompt_length), deduplicated by text."""
    out, seen = [], set()
    for n, row in enumerate(read_jsonl(path), 1):
        text = prompt_text_of(row, tokenizer, f"{path}:{n}")
        if text in seen:
            continue
        seen.add(text)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_length:]
        if not ids:
            raise DataError(f"{path}:{n}: empty prompt")
        out.append((text, ids))
    return out


@dataclass(frozen=True)
class PtxBatch:
    """Pretraining sequences for the ptx term, right-padded; `lower`: the actor's frozen trunk
    output for them `[B, T, H]` when the trunk is cached (trainable_layers), else None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lower: torch.Tensor | None = None
    n_frozen: int = 0


def ptx_logits(actor: Any, b: PtxBatch) -> torch.Tensor:
    """The actor's logits over a ptx batch (from the cached trunk when there is one)."""
    if b.lower is None:
        return actor(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    body, head = causal_lm_parts(actor)
    return head(upper_hidden(body, b.lower, b.attention_mask, b.n_frozen))


def load_ptx(path: str, tokenizer: Any, max_length: int) -> list[list[int]]:
    """The ptx corpus ({"text"} rows) as token ids, each cut to max_length; DataError when no
    text has 2 tokens or more (the loss needs a next token)."""
    texts = [r["text"] for r in read_jsonl(path, required=("text",)) if str(r["text"]).strip()]
    seqs = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise DataError(f"{path}: no text of at least 2 tokens")
    return seqs


TrunkFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""(ids, attention mask) -> the frozen trunk's output `[B, T, H]`."""


def ptx_batches(
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    *,
    trunk: TrunkFn | None = None,
    n_frozen: int = 0,
    cache_bytes: int = 0,
) -> Iterator[PtxBatch]:
    """Endless shuffled batches of the ptx corpus, with their own RNG so that plain PPO
    (γ_ptx = 0, never drawn from) runs exactly as without a corpus. With `trunk`, each batch
    carries the frozen trunk's output, computed the first time a sequence is drawn and kept
    (up to `cache_bytes`) for its later draws: the corpus is fixed and the trunk never trains."""
    rng = random.Random(seed)
    cache: dict[int, torch.Tensor] = {}
    cached_bytes = 0
    order: list[int] = []
    while True:
        chunk = []
        for _ in range(batch_size):
            if not order:  # a fresh shuffled pass over the corpus
                order = list(range(len(seqs)))
                rng.shuffle(order)
            chunk.append(order.pop())
        ids, attn = pad_batch([seqs[i] for i in chunk], pad_id, device)
        if trunk is None:
            yield PtxBatch(ids, attn)
            continue
        missing = [j for j, i in enumerate(chunk) if i not in cache]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            new = trunk(ids[missing], attn[missing])
            for row, j in enumerate(missing):
                i = chunk[j]
                fresh[i] = new[row, : len(seqs[i])]
                size = fresh[i].numel() * fresh[i].element_size()
                if i not in cache and cached_bytes + size <= cache_bytes:
                    cache[i] = fresh[i].clone()
                    cached_bytes += size
        rows = [cache.get(i, fresh.get(i)) for i in chunk]
        yield PtxBatch(ids, attn, pad_hidden(rows), n_frozen)  # type: ignore[arg-type]


def ptx_stream(
    path: str, tokenizer: Any, max_length: int, batch_size: int, seed: int, device: torch.device
) -> Iterator[PtxBatch]:
    """`load_ptx` then `ptx_batches` without a trunk: the file is read and checked here, before
    any batch is asked for."""
    seqs = load_ptx(path, tokenizer, max_length)
    return ptx_batches(seqs, tokenizer.pad_token_id, batch_size, seed, device)


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


def policy_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The actor's weights under Hugging Face names, LoRA deltas merged in (W + s·B·A) without
    touching the model, tied duplicates dropped: what the rollout engine loads."""
    if not hasattr(model, "get_base_model"):
        return save_state_dict(model)
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer) and mod.active_adapters:
            delta = sum(mod.get_delta_weight(a) for a in mod.active_adapters if a in mod.lora_A)
            deltas[f"{name}.weight"] = delta
    out: dict[str, torch.Tensor] = {}
    for name, t in save_state_dict(base).items():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        if clean in deltas:
            t = (t + deltas[clean]).detach()
        out[clean] = t
    return out


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def load_models(cfg: PPOConfig, device: torch.device) -> tuple[Any, Any, Any, Any, str, TrunkSplit]:
    """(actor, reference or None with LoRA, critic, reward scorer or None, policy path, the
    frozen-trunk split of `trainable_layers`)."""
    import torch
    from instructloop.training.reward_model import RewardScorer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy_path = resolve_model_path(cfg.policy_path)
    kw = train_model_kwargs(cfg, device)
    actor = AutoModelForCausalLM.from_pretrained(policy_path, **kw).to(device)
    actor.config.use_cache = False
    reference = None
    reference_path = resolve_model_path(cfg.reference_path or policy_path)
    # With LoRA and the policy as reference, the frozen base under the adapters IS the
    # reference: no second copy. A different reference model is loaded as such.
    same = Path(reference_path).resolve() == Path(policy_path).resolve()
    if not (cfg.use_lora and same):
        reference = AutoModelForCausalLM.from_pretrained(reference_path, **kw)
        reference.to(device).eval().requires_grad_(False)
    scorer = None
    if cfg.reward_model_path:
        scorer = RewardScorer(
            cfg.reward_model_path,
            device=device,
            max_length=cfg.max_prompt_length + cfg.max_new_tokens + 1,
            mixed_precision=cfg.mixed_precision,
        )
    # The critic starts from the RM (paper); with a programmatic reward, from the policy with a
    # zero value head (every state worth 0 until it learns otherwise).
    value_path = cfg.value_model_path or cfg.reward_model_path
    critic = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(value_path or policy_path), num_labels=1, **kw
    ).to(device)
    critic.config.use_cache = False
    if not value_path:
        with torch.no_grad():
            backbone_and_head(critic)[1].weight.zero_()
    if cfg.use_lora:
        from peft import LoraConfig, get_peft_model

        targets: Any = cfg.lora_target_modules
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        actor = get_peft_model(
            actor,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
        critic = get_peft_model(
            critic,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=targets,
                task_type="SEQ_CLS",
                modules_to_save=["score"],
            ),
        )
    split = TrunkSplit()
    if cfg.trainable_layers is not None:
        actor_body, critic_body = causal_lm_parts(actor)[0], backbone_and_head(critic)[0]
        try:
            n_actor = freeze_lower(actor_body, cfg.trainable_layers)
            n_critic = freeze_lower(critic_body, cfg.trainable_layers)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        split = TrunkSplit(
            actor=n_actor,
            critic=n_critic,
            reference_shares_actor=same,
            critic_shares_actor=(
                n_actor == n_critic and same_trunk(actor_body, critic_body, n_actor)
            ),
        )
    if cfg.gradient_checkpointing:
        actor.gradient_checkpointing_enable()
        critic.gradient_checkpointing_enable()
    return actor, reference, critic, scorer, policy_path, split


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
    import torch

    validate(cfg)
    if not cfg.output_dir or not cfg.prompts_path:
        raise ConfigError("output_dir and prompts_path are required")
    if Path(cfg.output_dir).exists() and not cfg.overwrite:
        raise ConfigError(f"{cfg.output_dir} exists (set overwrite=true to replace it)")
    if reward_fn is None and cfg.reward_fn:
        reward_fn = resolve_reward_fn(cfg.reward_fn)
    if (reward_fn is None) == (not cfg.reward_model_path):
        raise ConfigError("give exactly one reward: reward_model_path, reward_fn or a callable")
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    prepare_runtime(cfg, device)

    # Data first: a bad file fails before any model is loaded.
    tok = load_tokenizer(resolve_model_path(cfg.policy_path))
    prompts = load_prompts(cfg.prompts_path, tok, cfg.max_prompt_length)
    ptx_seqs = None
    if cfg.gamma_ptx > 0:
        assert cfg.ptx_path is not None  # validate() checked
        ptx_seqs = load_ptx(cfg.ptx_path, tok, cfg.ptx_max_length)
    actor, reference, critic, scorer, policy_path, split = load_models(cfg, device)
    ptx = None
    if ptx_seqs is not None:
        trunk_fn = None
        if split.actor:
            actor_body = causal_lm_parts(actor)[0]

            def trunk_fn(ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
                with autocast(device, cfg.mixed_precision):
                    return lower_hidden(actor_body, ids, attn, split.actor)

        ptx = ptx_batches(
            ptx_seqs, tok.pad_token_id, cfg.ptx_batch_size, cfg.seed + 1, device,
            trunk=trunk_fn, n_frozen=split.actor, cache_bytes=cfg.ptx_trunk_cache_mib << 20,
        )  # fmt: skip
    if scorer is not None and scorer.tokenizer.get_vocab() != tok.get_vocab():
        raise ConfigError("the reward model's tokenizer differs from the policy's")
    trainable = [p for p in actor.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    opt = adamw(
        [{"params": trainable, "lr": cfg.lr}, {"params": critic_params, "lr": cfg.critic_lr}],
        betas=cfg.adam_betas,
        weight_decay=cfg.weight_decay,
    )
    # Constant LR after a linear warm-up of 10 iterations (paper), counted in PPO steps.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )
    scorer_std = 1.0
    if scorer is not None:
        scorer_std = scorer.std
    running = RunningStd()

    own_engine = engine is None
    if engine is None:
        from instructloop.training.rollout import RolloutEngine

        engine = RolloutEngine(
            policy_path,
            dtype=cfg.vllm_dtype,
            max_model_len=cfg.vllm_max_model_len or (cfg.max_prompt_length + cfg.max_new_tokens),
            seed=cfg.seed,
            kv_cache_gib=cfg.vllm_kv_cache_gib,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        )
    n_steps = cfg.total_episodes // cfg.batch_size
    log_path = default_log_path(cfg.output_dir, cfg.log_path)
    prompt_rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    stop: dict[str, Any] | None = None
    nan_streak = 0
    last: dict[str, float] = {}
    history: list[dict[str, float]] = []
    ema = None
    if cfg.ema_decay:
        ema = {k: v.detach().clone() for k, v in policy_state_dict(actor).items()}
    try:
        # A reused engine may hold other weights: start from exactly the actor's.
        if not own_engine:
            engine.load_state_dict(policy_state_dict(actor))
        with MetricsLog(log_path, total=n_steps, desc="ppo", progress=cfg.progress) as mlog:
            for step in range(1, n_steps + 1):
                # 1. rollout on vLLM with the current policy
                t0 = time.perf_counter()
                chosen = []
                while len(chosen) < cfg.batch_size:  # epochs over the prompt set
                    if not order:
                        order = list(range(len(prompts)))
                        prompt_rng.shuffle(order)
                    chosen.append(prompts[order.pop()])
                rollouts = engine.generate(
                    [ids for _, ids in chosen],
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                )
                t_gen = time.perf_counter() - t0

                # 2. score: RM (+ bias) or the programmatic reward
                if scorer is not None:
                    raw = scorer.score_ids(reward_model_inputs(rollouts, tok.eos_token_id))
                    std = scorer_std
                else:
                    assert reward_fn is not None
                    raw = [
                        float(x)
                        for x in reward_fn([t for t, _ in chosen], [r.text for r in rollouts])
                    ]
                    if len(raw) != len(rollouts):
                        raise ValueError(
                            f"reward_fn returned {len(raw)} scores for {len(rollouts)} responses"
                        )
                    running.update(raw)
                    std = running.std if running.n > 1 else 1.0
                scores = shape_scores(
                    raw,
                    [r.ended_with_eos for r in rollouts],
                    std=max(std, 1e-6),
                    normalize=cfg.normalize_reward,
                    missing_eos_penalty=cfg.missing_eos_penalty,
                    clip=cfg.reward_clip,
                )

                # 3-4. per-token rewards (-β KL, score at the end), values, GAE advantages
                batch = make_batch(
                    rollouts,
                    scores,
                    actor=actor,
                    reference=reference,
                    critic=critic,
                    cfg=cfg,
                    pad_id=tok.pad_token_id,
                    device=device,
                    trunk=split,
                )
                lengths = [len(r.response_ids) for r in rollouts]
                row: dict[str, Any] = {
                    "reward": sum(raw) / len(raw),
                    "score": sum(scores) / len(scores),
                    **batch.stats,
                    "response_length": sum(lengths) / len(lengths),
                    "eos_fraction": sum(r.ended_with_eos for r in rollouts) / len(rollouts),
                    "lr": sched.get_last_lr()[0],
                    "rollout_seconds": t_gen,
                }
                # Guard: a KL blow-up against the reference ends the run before more damage.
                if cfg.kl_stop is not None and not (batch.stats["kl_k3"] <= cfg.kl_stop):
                    stop = {"reason": "kl", "step": step, "kl_k3": batch.stats["kl_k3"]}
                    mlog.log(step, {**row, "early_stop": "kl"})
                    break

                # 5. PPO (+ ptx) update
                t1 = time.perf_counter()
                upd = ppo_update(
                    actor, critic, opt, batch, cfg, ptx_batches=ptx, generator=gen, device=device
                )
                sched.step()
                row.update(upd, update_seconds=time.perf_counter() - t1)
                nan_streak = nan_streak + 1 if upd["skipped_minibatches"] else 0

                # 6. the rollout engine gets the new weights
                weights = policy_state_dict(actor)
                row["sync_seconds"] = engine.load_state_dict(weights)
                if ema is not None:  # θ_ema <- d·θ_ema + (1 - d)·θ
                    for k, v in weights.items():
                        ema[k].lerp_(v.detach(), 1.0 - float(cfg.ema_decay or 0.0))
                mlog.log(step, row, show=("reward", "kl", "response_length"))
                mlog.advance()
                last = {k: float(v) for k, v in row.items() if isinstance(v, int | float)}
                history.append({k: last[k] for k in ("reward", "kl") if k in last})
                if nan_streak >= cfg.max_nan_skips:
                    stop = {"reason": "nan", "step": step}
                    break
                if cfg.save_every and step % cfg.save_every == 0 and step < n_steps:
                    _save(
                        cfg,
                        actor,
                        tok,
                        policy_path,
                        last,
                        stop,
                        log_path,
                        out=f"{cfg.output_dir}.step{step}",
                        weights=ema,
                    )
    finally:
        if own_engine:
            engine.close()

    metrics = {
        **last,
        "steps": len(history),
        "first_reward": history[0]["reward"] if history else float("nan"),
        "final_reward": history[-1]["reward"] if history else float("nan"),
    }
    return _save(
        cfg, actor, tok, policy_path, metrics, stop, log_path, out=cfg.output_dir, weights=ema
    )


def _save(
    cfg: PPOConfig,
    actor: Any,
    tok: Any,
    policy_path: str,
    metrics: dict[str, Any],
    stop: dict[str, Any] | None,
    log_path: Path,
    *,
    out: str,
    weights: dict[str, torch.Tensor] | None = None,
) -> CheckpointInfo:
    import torch

    model = actor
    if weights is None and hasattr(actor, "get_base_model"):
        weights = policy_state_dict(actor)  # LoRA merged
    if weights is not None:
        # A plain copy for saving (EMA or merged LoRA); training (save_every) goes on as it was.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"saving the policy: missing {missing}, unexpected {unexpected}")
    return write_checkpoint(
        out,
        model=model,
        tokenizer=tok,
        stage="ppo",
        config=config_to_dict(cfg),
        metrics=metrics,
        parent_path=policy_path,
        parent_version=cfg.parent_version,
        data_snapshot=cfg.data_snapshot or data_snapshot_of(cfg.prompts_path),
        save_dtype=cfg.save_dtype if cfg.save_dtype != "auto" else model_dtype_name(policy_path),
        extra={"early_stop": stop, "reward": _reward_source(cfg)},
        extra_files={"metrics.jsonl": log_path},
        overwrite=cfg.overwrite or out != cfg.output_dir,
    )


def _reward_source(cfg: PPOConfig) -> dict[str, Any]:
    return {"reward_model_path": cfg.reward_model_path, "reward_fn": cfg.reward_fn}


__all__ = [
    "PtxBatch",
    "RewardFn",
    "RolloutBatch",
    "RunningStd",
    "load_prompts",
    "load_ptx",
    "make_batch",
    "policy_state_dict",
    "ppo_update",
    "ptx_batches",
    "ptx_logits",
    "reward_model_inputs",
    "run_ppo",
    "shape_scores",
    "token_rewards",
]
