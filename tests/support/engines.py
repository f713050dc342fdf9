"""What the tests read from a vLLM rollout engine (PPO's RolloutEngine): greedy tokens, token
log-probabilities, and the mean reward of samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def vllm_greedy(engine: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The engine's greedy tokens (EOS included, as the last)."""
    rollouts = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    return [r.response_ids for r in rollouts]


def vllm_token_logprobs(engine: Any, seqs: list[list[int]]) -> list[list[float]]:
    """The engine's log-probability of each token of each sequence given the tokens before it
    (vLLM's prompt_logprobs; the first token has none). Unlike greedy tokens, these move with
    any weight change, so they tell two policies apart even where both answer alike."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = engine.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
    return [
        [lp[t].logprob for t, lp in zip(s[1:], o.prompt_logprobs[1:], strict=True)]
        for s, o in zip(seqs, outs, strict=True)
    ]


def sampled_reward(
    engine: Any,
    checkpoint: Path,
    prompts: list[list[int]],
    reward_fn: Any,
    *,
    reps: int = 8,
    max_new_tokens: int = 8,
) -> float:
    """Mean reward of `reps` samples per prompt (temperature 1) from `checkpoint`, loaded into
    the engine. 384 samples estimate it to about 0.015, a PPO log row's 32 to about 0.05."""
    engine.load_checkpoint(checkpoint)
    outs = engine.generate(prompts * reps, max_new_tokens=max_new_tokens, temperature=1.0)
    rewards = reward_fn([""] * len(outs), [o.text for o in outs])
    return sum(rewards) / len(rewards)
