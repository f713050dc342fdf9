"""One config dataclass per training stage, in the manner of TRL's `*_config.py`.

Every field is documented where it is declared. Where a default comes from InstructGPT
(Ouyang et al., 2022) the paper's value is named beside it ("paper: ..."); where the default
differs from the paper (a 135M model on a CPU is not a 175B model on a cluster) the comment says
why. Configs load from a JSON or TOML file (`load_config`), with `key=value` overrides, and go
into each checkpoint's manifest as `dataclasses.asdict(cfg)`.

This module imports nothing heavy (the CLI imports it for `--help`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from instructloop.errors import ConfigError


@dataclass
class StageConfig:
    """Fields every stage shares: where the result goes, and how it runs."""

    output_dir: str = ""
    """Where the checkpoint directory is written (atomically: a temp sibling, then a rename)."""
    overwrite: bool = False
    """Replace an existing checkpoint at `output_dir`; without it, an existing one is an error."""
    seed: int = 0
    """Seeds torch, Python's `random` and the rollout engine."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ..."""
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    """Forward/backward under bf16 autocast with float32 master weights. "auto": bf16 on CUDA
    (when supported), none on CPU, where bf16 without native support is emulated and slower
    than float32. On a CPU with native bf16 (AMX, AVX512-BF16) set "bf16", which is faster than
    float32 there (benchmarks/HISTORY.md)."""
    save_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype of the saved weights. "auto": the dtype of the model the stage started from, so the
    server loads the new checkpoint exactly as it loaded the old one."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory (useful on GPUs for the larger models)."""
    attn_implementation: Literal["auto", "eager", "sdpa"] = "auto"
    """Attention kernels of the models this stage trains. "auto": eager on the CPU, sdpa
    elsewhere, because PyTorch's CPU SDPA backward is slow enough that a PPO update runs faster
    with eager attention (benchmarks/ppo_speed.py, benchmarks/HISTORY.md)."""
    cpu_allocator_tuning: bool = True
    """On Linux/glibc CPUs, keep freed memory in the heap (mallopt) so that the per-step weight
    casts and gradients do not page-fault fresh memory every minibatch, which shortens a PPO
    update (benchmarks/HISTORY.md). The process keeps its peak memory until it exits."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm (not in the paper; standard, and a NaN guard)."""
    parent_version: str | None = None
    """Registry version of the model this stage starts from; written to the manifest."""
    data_snapshot: str | None = None
    """Export snapshot id of the training data; None: read from the export's manifest.json."""
    log_path: str | None = None
    """Per-step metrics JSONL; None: `<output_dir>.metrics.jsonl` while training, and a copy
    (`metrics.jsonl`) goes into the checkpoint."""
    progress: bool = True
    """Show tqdm progress bars."""


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning on demonstrations (InstructGPT §3.5, App. C.1)."""

    model_path: str = ""
    """The model to fine-tune (HF directory); "" = the default policy (SmolLM2-135M-Instruct)."""
    train_path: str = ""
    """sft.jsonl: {"prompt_text", "completion"} (or {"prompt": str | messages, "completion"};
    the chat template is applied to messages)."""
    val_path: str | None = None
    """Validation demonstrations; None: hold out `val_fraction` of `train_path`."""
    val_fraction: float = 0.05
    """Share of `train_path` held out when there is no `val_path` (at least one example)."""
    epochs: int = 1
    """Passes over the data (paper: 16; selection by RM score picks the epoch)."""
    batch_size: int = 8
    """Demonstrations per optimizer step, after accumulation (paper: 32)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; each micro-batch is batch_size / grad_accum."""
    lr: float = 9.65e-6
    """Peak learning rate (paper: 9.65e-6 for 1.3B and 6B)."""
    lr_final_fraction: float = 0.1
    """Cosine decay ends at this fraction of the peak (paper: 10%)."""
    warmup_steps: int = 0
    """Linear warm-up steps (paper: none)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam β1, β2 (paper: 0.9, 0.95)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (the paper does not say; 0)."""
    residual_dropout: float = 0.2
    """Dropout on each residual branch (attention and MLP outputs) while training (paper: 0.2).
    Set through the model config's dropout fields where the architecture has them (GPT-2's
    resid_pdrop), else by hooks on the attention/MLP blocks (Llama has no residual dropout)."""
    max_length: int = 1024
    """Prompt + response tokens; longer examples are cut from the left of the prompt."""
    eval_every: int = 0
    """Evaluate (and consider for selection) every N optimizer steps; 0 = at each epoch end."""
    reward_model_path: str | None = None
    """A reward-model checkpoint: select the checkpoint by its mean score of greedy samples on
    validation prompts (paper §3.5); None: select by validation loss."""
    select_max_prompts: int = 32
    """Validation prompts sampled for RM-score selection."""
    select_max_new_tokens: int = 128
    """Response length limit for RM-score selection samples."""


@dataclass
class RewardModelConfig(StageConfig):
    """The reward model (InstructGPT §3.5, App. C.2): policy backbone + scalar head, trained on
    K-way rankings with all C(K, 2) pairs of a prompt in one batch element (eq. 1)."""

    model_path: str = ""
    """Backbone to start from, usually the SFT checkpoint (paper: the 6B SFT model);
    "" = the default policy."""
    train_path: str = ""
    """rankings.jsonl: {"prompt_text", "responses" best first, "ranks" (equal = tie)}."""
    val_path: str | None = None
    """Held-out rankings for pairwise accuracy; None: hold out `val_fraction` of `train_path`."""
    val_fraction: float = 0.1
    """Share of `train_path` held out when there is no `val_path`."""
    reference_path: str | None = None
    """Demonstrations (sft.jsonl) whose mean score is set to 0 after training (paper). None: the
    best response of each training ranking (what the export writes to sft.jsonl)."""
    epochs: int = 1
    """Passes over the rankings (paper: 1; more overfits)."""
    batch_size: int = 8
    """Prompts (ranking groups) per optimizer step (paper: 64)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 9e-6
    """Peak learning rate (paper: 9e-6)."""
    head_lr: float | None = None
    """Learning rate of the new scalar head; None = `lr`."""
    lr_final_fraction: float = 0.1
    """Cosine decay to this fraction of the peak (paper: 10%)."""
    warmup_steps: int = 0
    """Linear warm-up steps (paper: none stated)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam β1, β2 (as for SFT)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_length: int = 1024
    """Prompt + response tokens per scored sequence (prompt cut from the left)."""
    max_responses: int = 9
    """Largest K used from one ranking (paper: K = 4 to 9); longer rankings keep the top K."""
    trainable_layers: int | None = None
    """Train only the top N decoder layers and the head; the embeddings and the layers below
    are frozen, and their output is computed once per response for all epochs
    (training/trunk.py). None = the whole backbone trains (paper)."""


@dataclass
class PPOConfig(StageConfig):
    """PPO-ptx (InstructGPT §3.5, App. C.3-C.4, eq. 2). γ_ptx = 0 gives plain PPO."""

    # -- models
    policy_path: str = ""
    """The actor's start, the SFT model; "" = the default policy."""
    reference_path: str | None = None
    """The frozen KL reference; None = `policy_path` (paper: the SFT model)."""
    reward_model_path: str | None = None
    """Reward-model checkpoint; or give `reward_fn` (exactly one of the two)."""
    reward_fn: str | None = None
    """A programmatic reward "module:function", called as f(prompts, responses) -> list[float].
    (run_ppo also takes the callable itself.)"""
    value_model_path: str | None = None
    """The critic's start; None = the reward model (paper: "value function starts from the RM"),
    or, with a programmatic reward, the policy with a zero-initialised value head."""

    # -- data
    prompts_path: str = ""
    """Prompts: jsonl with "prompt_text" (chat template already applied) or "prompt"
    (str or messages) or "messages"; sft/rankings exports work as is."""
    ptx_path: str | None = None
    """The pretraining-like corpus, jsonl {"text"}; needed when gamma_ptx > 0."""

    # -- schedule
    total_episodes: int = 256
    """Rollouts (prompt + sampled response) to train on (paper: 256k)."""
    batch_size: int = 16
    """Rollouts per PPO step (paper: 512)."""
    minibatch_size: int = 4
    """Rollouts per gradient step (paper: 64)."""
    ppo_epochs: int = 1
    """Passes over each batch of rollouts (paper: 1)."""
    lr: float = 1e-6
    """Actor learning rate (the paper sweeps it per model size; 1e-6 is a stable start)."""
    critic_lr: float = 5e-6
    """Critic (value model) learning rate."""
    warmup_steps: int = 10
    """Linear warm-up iterations, then constant (paper: 10, constant LR)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam β1, β2."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""

    # -- generation (rollouts on vLLM)
    max_prompt_length: int = 512
    """Prompts longer than this are cut from the left."""
    max_new_tokens: int = 64
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1)."""
    top_p: float = 1.0
    """Nucleus sampling (1 = plain sampling, which the ratio π/π_old assumes)."""

    # -- objective (eq. 2)
    kl_coef: float = 0.02
    """β of the per-token KL penalty against the reference (paper: 0.02)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward (k1 is eq. 2's log π/π_SFT; k3 is ≥ 0)."""
    gamma_ptx: float = 27.8
    """γ of the pretraining term (paper: 27.8; 0 = plain PPO). DeepSpeed-Chat found 27.8
    unstable for small models: tune it for yours."""
    ptx_batch_size: int = 4
    """ptx sequences per gradient step (paper: 8× as many pretraining examples as episodes)."""
    ptx_max_length: int = 256
    """Tokens per ptx sequence."""
    ptx_trunk_cache_mib: int = 1024
    """With trainable_layers: memory (MiB) for keeping the frozen trunk's output on ptx
    sequences, so a sequence drawn again skips the trunk (the corpus is fixed). 0 = recompute
    every time. A 576-wide model needs about 2.3 KiB per token."""
    gamma: float = 1.0
    """GAE discount (paper: 1)."""
    lam: float = 0.95
    """GAE λ (the paper does not say; 0.95 as TRL and DeepSpeed-Chat)."""
    cliprange: float = 0.2
    """Policy ratio clip ε (paper: 0.2)."""
    cliprange_value: float | None = 0.2
    """Value clip around the rollout's values; None = unclipped."""
    vf_coef: float = 0.1
    """Weight of the value loss (TRL: 0.1)."""
    whiten_advantages: bool = True
    """Normalise advantages over each batch to mean 0, std 1."""
    normalize_reward: bool = True
    """Divide the score by the RM's std stored at RM training (OpenRLHF), or, with a
    programmatic reward, by a running std of the scores seen."""
    reward_clip: float | None = 5.0
    """Clip the (normalised) score to ±this (DeepSpeed-Chat: 5); None = no clip."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a response that ended without EOS (cut at max_new_tokens),
    so length runaway does not pay (TRL recommends it); 0 = off. It is applied after
    normalize_reward, so 1.0 is one RM standard deviation: where many early rollouts are cut
    (a short max_new_tokens) it can teach the policy to stop early, which is why the default
    recipe runs with 0 (training/recipes.py; benchmarks/HISTORY.md)."""

    # -- guards
    kl_stop: float | None = 30.0
    """Stop training when a rollout's mean per-sequence KL to the reference (k3 estimate, nats,
    ≥ 0) passes this: a blow-up, not the few nats a healthy run drifts. The manifest records
    the stop and the checkpoint is the policy that produced that rollout. None = never."""
    max_nan_skips: int = 3
    """Consecutive non-finite losses whose step is skipped before the run stops."""

    # -- memory
    use_lora: bool = False
    """Train LoRA adapters (peft) instead of all weights (actor and critic); when the reference is
    the policy itself, it is the actor with adapters disabled (no second copy). The saved
    checkpoint has the adapters merged (a plain model for vLLM and transformers)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    lora_target_modules: str = "all-linear"
    """peft target_modules: "all-linear" or a comma-separated list of module names."""

    trainable_layers: int | None = None
    """Train only the top N decoder layers of the actor and the critic (and their heads); the
    embeddings and the layers below are frozen (trlx: num_layers_unfrozen). The frozen trunk
    then runs once per rollout, shared by the old log-probs, the reference (when it is the
    policy's start) and every PPO epoch (training/trunk.py): on a CPU a step costs a fraction.
    None = every weight trains (paper). Not with use_lora."""

    # -- rollout engine
    vllm_dtype: str = "auto"
    """dtype of the rollout engine ("auto": the checkpoint's; float32 on a CPU without native bf16,
    see instructloop.hardware.engine_dtype)."""
    vllm_kv_cache_gib: float = 1.0
    """KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE, GiB)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of GPU memory the rollout engine may take (the rest trains)."""
    vllm_max_model_len: int | None = None
    """Engine context length; None = max_prompt_length + max_new_tokens."""

    ema_decay: float | None = None
    """Keep an exponential moving average of the policy's weights, updated after every PPO step,
    and save it instead of the last weights (paper: 0.992); rollouts always use the live
    weights. None = off (over a few dozen steps an EMA of 0.992 stays near the start)."""
    save_every: int = 0
    """Also write `<output_dir>.step<N>` checkpoints every N PPO steps; 0 = only the final one."""


C = TypeVar("C", bound=StageConfig)


# ---------------------------------------------------------------------------------------------
# Loading: file + overrides -> a validated dataclass
# ---------------------------------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON (.json) or TOML (.toml) file as a flat dict of field values."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e}") from e
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: not valid {p.suffix.lstrip('.') or 'JSON'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a table/object of config fields")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["lr=1e-5", "use_lora=true", "val_path=null"]` -> values (JSON when it parses, else the
    string as is, so `output_dir=/tmp/x` needs no quotes)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build `cls` from a dict, converting and checking each value against the field's type.
    Unknown keys and wrong types raise ConfigError naming the field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(name, hints[name], value) for name, value in data.items()}
    cfg = cls(**kwargs)
    validate(cfg)
    return cfg


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """`cls` from an optional JSON/TOML file, then `key=value` overrides on top."""
    data = read_config_file(path) if path is not None else {}
    data.update(parse_overrides(overrides))
    return config_from_dict(cls, data)


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{name}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(name, a, v) for a, v in zip(args, value, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # `--set parent_version=3` parses as JSON 3
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def validate(cfg: StageConfig) -> None:
    """Range checks that do not need the file system. Raises ConfigError."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.max_grad_norm > 0, "max_grad_norm must be > 0")
    if isinstance(cfg, SFTConfig | RewardModelConfig):
        need(cfg.epochs >= 1, "epochs must be >= 1")
        need(cfg.batch_size >= 1, "batch_size must be >= 1")
        need(cfg.grad_accum >= 1, "grad_accum must be >= 1")
        need(cfg.batch_size % cfg.grad_accum == 0, "batch_size must be a multiple of grad_accum")
        need(cfg.lr > 0, "lr must be > 0")
        need(0.0 <= cfg.lr_final_fraction <= 1.0, "lr_final_fraction must be in [0, 1]")
        need(0.0 < cfg.val_fraction < 1.0, "val_fraction must be in (0, 1)")
        need(cfg.max_length >= 8, "max_length must be >= 8")
    if isinstance(cfg, SFTConfig):
        need(0.0 <= cfg.residual_dropout < 1.0, "residual_dropout must be in [0, 1)")
    if isinstance(cfg, RewardModelConfig):
        need(cfg.max_responses >= 2, "max_responses must be >= 2")
    if isinstance(cfg, PPOConfig):
        need(cfg.batch_size >= 1 and cfg.minibatch_size >= 1, "batch sizes must be >= 1")
        need(
            cfg.batch_size % cfg.minibatch_size == 0,
            "batch_size must be a multiple of minibatch_size",
        )
        need(cfg.total_episodes >= cfg.batch_size, "total_episodes must be >= batch_size")
        need(cfg.ppo_epochs >= 1, "ppo_epochs must be >= 1")
        need(cfg.kl_coef >= 0, "kl_coef must be >= 0")
        need(cfg.gamma_ptx >= 0, "gamma_ptx must be >= 0")
        need(0.0 < cfg.gamma <= 1.0, "gamma must be in (0, 1]")
        need(0.0 <= cfg.lam <= 1.0, "lam must be in [0, 1]")
        need(cfg.cliprange > 0, "cliprange must be > 0")
        need(cfg.temperature > 0, "temperature must be > 0 (PPO needs sampled rollouts)")
        need(0.0 < cfg.top_p <= 1.0, "top_p must be in (0, 1]")
        need(cfg.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        need(cfg.kl_estimator in ("k1", "k2", "k3"), "kl_estimator must be k1, k2 or k3")
        need(
            not (cfg.reward_model_path and cfg.reward_fn),
            "give reward_model_path or reward_fn, not both",
        )
        need(cfg.gamma_ptx == 0 or bool(cfg.ptx_path), "gamma_ptx > 0 needs ptx_path")
        need(cfg.ema_decay is None or 0.0 < cfg.ema_decay < 1.0, "ema_decay must be in (0, 1)")
        need(
            not (cfg.use_lora and cfg.trainable_layers is not None),
            "use_lora and trainable_layers are alternatives: set one",
        )
    if isinstance(cfg, RewardModelConfig | PPOConfig):
        need(
            cfg.trainable_layers is None or cfg.trainable_layers >= 1,
            "trainable_layers must be >= 1 (or null: all)",
        )


def config_to_dict(cfg: StageConfig) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


__all__ = [
    "ConfigError",
    "PPOConfig",
    "RewardModelConfig",
    "SFTConfig",
    "StageConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "read_config_file",
    "validate",
]
