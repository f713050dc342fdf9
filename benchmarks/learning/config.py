"""The sizes and settings of one learning run, and the tiny ones of a harness check."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from instructloop.training.recipes import DEFAULT_RECIPE


@dataclass
class LearningConfig:
    """Sizes and settings of one run. Defaults aim at the recipe's 60-minute budget on a 2-core
    CPU with native bf16 (benchmarks/HISTORY.md, "Learning")."""

    model: str = ""
    """The SFT policy; "" = the default model (SmolLM2-135M-Instruct)."""
    work_dir: str = ""
    """Checkpoints and data of the run; "" = a fresh temporary directory."""
    seed: int = 0
    n_train_prompts: int = 512
    """Training prompts: ranked for the RM, then PPO's prompt set. The RM's held-out accuracy,
    and with it PPO-ptx's gain, grows with the rankings (benchmarks/HISTORY.md, "Learning")."""
    n_rm_val_prompts: int = 64
    """Held-out prompts ranked for the RM's held-out accuracy."""
    n_eval_prompts: int = 200
    """Held-out prompts for accuracy before/after (disjoint from the RM validation prompts):
    enough that one accuracy's standard error stays well under the 10-point target."""
    k: int = 8
    """Samples ranked per prompt (paper: K = 4 to 9). K = 8 gives 28 pairs per prompt for the
    price of 8 samples, and fewer all-tied groups than a smaller K."""
    sample_max_tokens: int = 96
    """Length limit of the ranked samples (= PPO's max_new_tokens)."""
    eval_max_tokens: int = 96
    """Length limit of the greedy evaluation answers."""
    recipe: str = DEFAULT_RECIPE
    """The reward-model and PPO-ptx settings: the cycle's own recipe (training/recipes.py), so
    the benchmark measures what the product ships."""
    rm: dict[str, Any] = field(default_factory=dict)
    """RewardModelConfig overrides on top of the recipe's (an experiment, not the default)."""
    ppo: dict[str, Any] = field(default_factory=dict)
    """PPOConfig overrides on top of the recipe's, shared by both runs; gamma_ptx applies to the
    PPO-ptx run only."""
    plain_ppo: bool = True
    """Also train plain PPO (γ_ptx = 0) for the alignment-tax comparison."""
    eval_steps: bool = False
    """Also score the intermediate checkpoints that `ppo={"save_every": N}` writes
    (`<run>.stepN`): held-out accuracy and answer length along the run."""
    resume: bool = True
    """Reuse what an interrupted run with the same work_dir finished (samples, checkpoints);
    the phase times of a resumed run are those of the run that did the work."""


def quick(cfg: LearningConfig) -> LearningConfig:
    """Tiny sizes: checks the harness end to end, not the learning."""
    return dataclasses.replace(
        cfg,
        n_train_prompts=16,
        n_rm_val_prompts=8,
        n_eval_prompts=8,
        sample_max_tokens=24,
        eval_max_tokens=24,
        rm={**cfg.rm, "epochs": 1},
        ppo={**cfg.ppo, "total_episodes": 16, "batch_size": 8, "minibatch_size": 4},
    )
