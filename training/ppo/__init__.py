"""Stage 3 of InstructGPT: PPO-ptx (§3.5, App. C.3-C.4), eq. 2:

    objective(φ) = E_(x,y)~π_φ [ r_θ(x, y) - β log(π_φ(y|x) / π_SFT(y|x)) ]
                 + γ_ptx E_x~D_pretrain [ log π_φ(x) ]

One PPO step per batch of prompts, in small named parts (after OpenRLHF's trainer/ppo_utils):

- loop.py: `run_ppo(cfg)`, the loop, read top to bottom;
- rollout.py: the vLLM engine rollouts are sampled from, kept in step with the actor's weights;
- experience.py: rollout -> scores -> per-token KL-penalised rewards -> GAE advantages;
- rewards.py: the reward model's or a programmatic reward's score, shaped; eq. 2's per-token
  reward;
- update.py: the PPO-ptx minibatch update (eq. 2 as gradients);
- batch.py: the experience as tensors, and the policy and critic passes over it;
- models.py: actor, reference, critic and reward model; the actor's weights, LoRA merged;
- data.py: the prompts and the ptx corpus.
"""

from instructloop.training.ppo.batch import RolloutBatch, TrunkSplit, causal_lm_parts
from instructloop.training.ppo.data import PtxBatch, load_prompts, load_ptx, ptx_batches, ptx_stream
from instructloop.training.ppo.experience import make_batch
from instructloop.training.ppo.loop import run_ppo
from instructloop.training.ppo.models import policy_state_dict
from instructloop.training.ppo.rewards import (
    RewardFn,
    RunningStd,
    reward_model_inputs,
    shape_scores,
    token_rewards,
)
from instructloop.training.ppo.update import ppo_update, ptx_logits

__all__ = [
    "PtxBatch",
    "RewardFn",
    "RolloutBatch",
    "RunningStd",
    "TrunkSplit",
    "causal_lm_parts",
    "load_prompts",
    "load_ptx",
    "make_batch",
    "policy_state_dict",
    "ppo_update",
    "ptx_batches",
    "ptx_logits",
    "ptx_stream",
    "reward_model_inputs",
    "run_ppo",
    "shape_scores",
    "token_rewards",
]
