"""The models of a PPO run: the actor (the policy that trains), the frozen reference of the KL
penalty, the critic (value model) and the reward model; and the actor's weights as the rollout
engine and the checkpoint take them (LoRA merged)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from instructloop.errors import ConfigError
from instructloop.training.checkpoint import save_state_dict
from instructloop.training.config import PPOConfig
from instructloop.training.models import resolve_model_path, train_model_kwargs
from instructloop.training.ppo.batch import TrunkSplit, causal_lm_parts
from instructloop.training.reward_model.head import backbone_and_head
from instructloop.training.reward_model.scorer import RewardScorer
from instructloop.training.trunk import freeze_lower, same_trunk


@dataclass
class PPOModels:
    actor: Any
    reference: Any
    """None with LoRA when the reference is the policy: the actor with its adapters disabled."""
    critic: Any
    scorer: RewardScorer | None
    """None with a programmatic reward."""
    split: TrunkSplit
    """The frozen-trunk split of `trainable_layers`."""


def load_models(cfg: PPOConfig, device: torch.device, policy_path: str) -> PPOModels:
    """The actor and reference from `policy_path` / `reference_path`, the reward model, and the
    critic; then LoRA adapters or a frozen trunk when the config asks for them."""
    from transformers import AutoModelForCausalLM

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
    critic = load_critic(cfg, policy_path, kw, device)
    if cfg.use_lora:
        actor, critic = with_lora(cfg, actor, critic)
    split = TrunkSplit()
    if cfg.trainable_layers is not None:
        split = freeze_trunks(cfg, actor, critic, reference_shares_actor=same)
    if cfg.gradient_checkpointing:
        actor.gradient_checkpointing_enable()
        critic.gradient_checkpointing_enable()
    return PPOModels(actor, reference, critic, scorer, split)


def load_critic(cfg: PPOConfig, policy_path: str, kw: dict[str, Any], device: torch.device) -> Any:
    """The critic starts from the RM (paper); with a programmatic reward, from the policy with a
    zero value head (every state worth 0 until it learns otherwise)."""
    from transformers import AutoModelForSequenceClassification

    value_path = cfg.value_model_path or cfg.reward_model_path
    critic = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(value_path or policy_path), num_labels=1, **kw
    ).to(device)
    critic.config.use_cache = False
    if not value_path:
        with torch.no_grad():
            backbone_and_head(critic)[1].weight.zero_()
    return critic


def with_lora(cfg: PPOConfig, actor: Any, critic: Any) -> tuple[Any, Any]:
    """The actor and the critic with LoRA adapters (the critic's value head trains in full)."""
    from peft import LoraConfig, get_peft_model

    targets: Any = cfg.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]

    def lora(task_type: str, **extra: Any) -> Any:
        return LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            task_type=task_type,
            **extra,
        )

    actor = get_peft_model(actor, lora("CAUSAL_LM"))
    critic = get_peft_model(critic, lora("SEQ_CLS", modules_to_save=["score"]))
    return actor, critic


def freeze_trunks(
    cfg: PPOConfig, actor: Any, critic: Any, *, reference_shares_actor: bool
) -> TrunkSplit:
    """Freeze all but the top `trainable_layers` of the actor and the critic, and say which
    models can share the actor's frozen trunk output."""
    actor_body, critic_body = causal_lm_parts(actor)[0], backbone_and_head(critic)[0]
    try:
        n_actor = freeze_lower(actor_body, cfg.trainable_layers)
        n_critic = freeze_lower(critic_body, cfg.trainable_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return TrunkSplit(
        actor=n_actor,
        critic=n_critic,
        reference_shares_actor=reference_shares_actor,
        critic_shares_actor=n_actor == n_critic and same_trunk(actor_body, critic_body, n_actor),
    )


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


__all__ = ["PPOModels", "load_models", "policy_state_dict"]
