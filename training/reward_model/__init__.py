"""Stage 2 of InstructGPT: the reward model (§3.5, App. C.2).

r_θ(x, y) is the policy's backbone with a scalar head (transformers'
`AutoModelForSequenceClassification`, num_labels = 1), read at the last token of prompt + response
(the EOS that closes the response).

- head.py: the scalar head on the backbone, per token and per sequence;
- rankings.py: K-way rankings, packed one prompt per row, and their rewards (eq. 1's input);
- train.py: `run_reward_model(cfg)`, the stage;
- scorer.py: `RewardScorer`, a trained reward model used for scoring (SFT, PPO, evaluation).

Loading outside this package: `AutoModelForSequenceClassification.from_pretrained(dir)` gives the
raw head output; add `config.instructloop_reward_bias` (RewardScorer does). The config's
pad_token_id is set to a token other than EOS where the tokenizer has one, so transformers'
own pooling ("last non-pad token") also reads the reward at the EOS. vLLM serves the directory
as a pooling model (`LLM(dir, runner="pooling").classify(...)`): it returns σ(raw score), so the
reward is logit(p) + bias (tests/training/test_checkpoints.py checks this).
"""

from instructloop.training.reward_model.head import (
    BIAS_KEY,
    STD_KEY,
    backbone_and_head,
    reward_pad_token_id,
    sequence_rewards,
    token_scores,
)
from instructloop.training.reward_model.rankings import RankingGroup, group_rewards, load_rankings
from instructloop.training.reward_model.scorer import RewardScorer
from instructloop.training.reward_model.train import evaluate_rankings, run_reward_model

__all__ = [
    "BIAS_KEY",
    "STD_KEY",
    "RankingGroup",
    "RewardScorer",
    "backbone_and_head",
    "evaluate_rankings",
    "group_rewards",
    "load_rankings",
    "reward_pad_token_id",
    "run_reward_model",
    "sequence_rewards",
    "token_scores",
]
