"""Recipes: the reward-model and PPO-ptx settings that teach a model of a given size.

A training cycle (instructloop.training.loop) runs its recipe's settings, then the cycle config's
own overrides on top; the learning benchmark (benchmarks/learning/) runs the same recipe.
InstructGPT's values (Ouyang et al., 2022, App. C) are for 1.3B-175B models trained on a cluster
for 256k episodes; a 135M model trained for a few dozen PPO steps on a CPU needs other values,
and each departure below names the paper's value and why (the measurements behind them:
benchmarks/HISTORY.md, "Learning").

A recipe is chosen by name (`CycleConfig.recipe`); the default model's is the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from instructloop.hardware import cpu_native_bf16


@dataclass(frozen=True)
class Recipe:
    """Overrides of RewardModelConfig and PPOConfig (training/config.py) for one model size."""

    name: str
    description: str
    reward_model: dict[str, Any] = field(default_factory=dict)
    ppo: dict[str, Any] = field(default_factory=dict)
    step_memory_gib: dict[str, float] = field(default_factory=dict)
    """Memory each heavy cycle step needs free before it starts (the training loop refuses the
    step with a clear message otherwise): the step's peak resident memory with headroom."""

    def reward_model_overrides(self) -> dict[str, Any]:
        return {"mixed_precision": train_precision(), **self.reward_model}

    def ppo_overrides(self) -> dict[str, Any]:
        return {"mixed_precision": train_precision(), **self.ppo}


def train_precision() -> str:
    """bf16 autocast where the CPU computes bf16 natively (AMX, AVX512-BF16) and on CUDA
    (StageConfig's "auto"); float32 on other CPUs, where emulated bf16 is several times slower."""
    return "bf16" if cpu_native_bf16() else "auto"


SMOLLM2_135M = Recipe(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct, the default model, on a small CPU or one GPU",
    reward_model={
        # Only the top third of the network trains (paper: the whole 6B model): the frozen
        # trunk's output is computed once per response for all epochs (training/trunk.py), and
        # the held-out accuracy was higher than with the whole model at a lower rate.
        "trainable_layers": 10,
        "epochs": 2,  # paper: 1 (more overfits a 6B RM); 2 fit in the time and kept accuracy
        "batch_size": 8,  # prompts per step (paper: 64); a small data set needs more steps
        "grad_accum": 4,  # micro-batches of 2 groups of K: bounds activation memory
        "lr": 1e-4,  # paper: 9e-6 for the whole 6B model; the top layers of 135M need more
        "head_lr": 1e-3,  # the new scalar head starts from zero
        "max_length": 320,  # prompt + a 96-token answer, with room
    },
    ppo={
        "trainable_layers": 10,  # as the RM (paper: every weight)
        "total_episodes": 1024,  # paper: 256k; 32 PPO steps of 32
        "batch_size": 32,  # paper: 512
        "minibatch_size": 16,  # paper: 64
        "ppo_epochs": 2,  # paper: 1; two passes over each small batch learned faster
        "lr": 3e-5,  # the paper sweeps it per size; 1e-6 moved this model too little
        "critic_lr": 3e-5,
        "warmup_steps": 2,  # paper: 10 of many more iterations
        "max_new_tokens": 96,  # long enough for the tasks' answers, short enough for a CPU
        # Paper: β 0.02. At 0.02 the small policy collapsed into what the small RM
        # over-rewards (repeated postscripts, bare titles) within a few dozen steps.
        "kl_coef": 0.05,
        # Paper: γ 27.8 for 175B; DeepSpeed-Chat found it unstable for small models. 0.5 kept
        # the held-out ptx loss at or below the start's.
        "gamma_ptx": 0.5,
        "ptx_batch_size": 4,
        "ptx_max_length": 192,
        # TRL recommends a missing-EOS penalty; on normalised rewards PPOConfig's 1.0 is one
        # RM standard deviation taken from the many early rollouts cut at 96 tokens, and it
        # taught the policy to stop early (shorter, collapsing answers).
        "missing_eos_penalty": 0.0,
    },
    # The step's own peak plus its vLLM engine's, as a cycle records them (summary:
    # peak_rss_gib, peak_rss_child_gib), with headroom (benchmarks/HISTORY.md, "Online").
    step_memory_gib={"reward_model": 5.0, "ppo": 10.0, "evaluate": 7.0},
)

INSTRUCTGPT = Recipe(
    name="instructgpt",
    description="the stage configs' own defaults, which follow the paper where it gives a value "
    "(for larger models on accelerators; tests use it with tiny models and their own overrides)",
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (SMOLLM2_135M, INSTRUCTGPT)}
DEFAULT_RECIPE = SMOLLM2_135M.name


def recipe(name: str) -> Recipe:
    """The recipe called `name`; ValueError naming the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        known = ", ".join(sorted(RECIPES))
        raise ValueError(f"unknown recipe {name!r} (known: {known})") from None
