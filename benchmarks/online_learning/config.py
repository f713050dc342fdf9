"""The sizes and settings of one online-learning run, and the tiny ones of a harness check."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class OnlineLearningConfig:
    """Sizes and settings of one run. `up` and the cycle run with their shipped defaults unless
    `up_args` / `cycle_config` say otherwise."""

    work_dir: str = ""
    """Logs and the data directory (`<work_dir>/data`, which must not exist yet or be empty);
    "" = a fresh temporary directory."""
    seed: int = 0
    """Seed of the training and held-out prompt draws."""
    n_train_prompts: int = 512
    """Training prompts the simulated users ask about and rank (one K-way ranking each): the
    reward model's held-out accuracy, and with it what PPO can learn, grows with the rankings
    (benchmarks/HISTORY.md, "Learning")."""
    n_eval_prompts: int = 200
    """Held-out prompts answered greedily before and after: enough that one accuracy's standard
    error stays well under the 10-point target."""
    k: int = 4
    """Candidates per training prompt (InstructGPT ranks K = 4 to 9)."""
    sample_temperature: float = 1.0
    """Temperature of the ranked candidates (InstructGPT samples at 1)."""
    sample_max_tokens: int = 96
    """Length limit of the ranked candidates."""
    eval_max_tokens: int = 96
    """Length limit of the greedy held-out answers."""
    users: int = 16
    """Simulated users, round robin: the feedback rate limit is per user and minute."""
    concurrency: int = 8
    """Requests in flight at once while collecting feedback and held-out answers."""
    probe_max_tokens: int = 16
    """Length of the streamed TTFT probes."""
    probe_interval_s: float = 2.0
    """One probe starts this often (or as soon as the previous ends, if later). A light, steady
    load: on two cores vLLM's scheduler busy-waits while any request is in flight, and the
    training steps (at the lowest priority) get only what serving leaves."""
    idle_probes: int = 60
    """Probes of the idle phase."""
    idle_settle_s: float = 10.0
    """Pause before the idle probes, after two warm-up requests: the worker and beat have just
    started beside the server."""
    traffic_probes: int = 30
    """Probes beside the users' requests before any cycle: the same traffic as during the
    cycle without training, so that the cycle's own cost on latency can be told apart from the
    traffic's (reported beside the target, which is against idle)."""
    cycle_request_interval_s: float = 10.0
    """During the cycle, besides the probes, a user asks for K candidates of a training prompt
    this often (logged, as real traffic is)."""
    settle_after_served_s: float = 5.0
    """The probes go on this long after the promoted version serves (the swap's aftermath)."""
    max_cycles: int = 1
    """Cycles to try: after a rejected one, another round of feedback on new training prompts
    and another cycle, up to this many."""
    cycle_config: dict[str, Any] = field(default_factory=dict)
    """CycleConfig fields passed with `cycle run --config`; empty: the shipped defaults."""
    up_args: list[str] = field(default_factory=list)
    """Extra arguments of `instructloop up` (none: as shipped)."""
    startup_timeout_s: float = 1200.0
    """`up` must serve within this (it builds the default model in the fresh data directory)."""
    cycle_timeout_s: float = 7200.0
    """`cycle run --wait --timeout`."""
    served_timeout_s: float = 300.0
    """After a promotion, the promoted version must serve within this."""
    request_timeout_s: float = 600.0
    """Deadline of each RPC (requests wait, not fail, while a swap loads)."""
    stop_timeout_s: float = 180.0
    """`up` must stop this long after SIGINT (it stops the worker, beat and Redis)."""


def quick(cfg: OnlineLearningConfig) -> OnlineLearningConfig:
    """Tiny sizes and a tiny cycle that any candidate passes: checks the harness end to end
    (promotion and swap included), not the learning."""
    return dataclasses.replace(
        cfg,
        n_train_prompts=24,
        n_eval_prompts=16,
        sample_max_tokens=32,
        eval_max_tokens=32,
        idle_probes=10,
        traffic_probes=5,
        idle_settle_s=2.0,
        cycle_config={
            "reward_model": {"epochs": 1},
            "ppo": {"total_episodes": 16, "batch_size": 8, "minibatch_size": 4},
            "evaluate": {"n_prompts": 8, "max_tokens": 32},
            "gate_min_win_rate_rm": 0.0,
            "gate_min_win_rate_judge": 0.0,
            "gate_max_ptx_loss_increase": 1e9,
            "gate_max_constraint_accuracy_drop": 1.0,
            **cfg.cycle_config,
        },
    )
