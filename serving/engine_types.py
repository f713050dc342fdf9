"""What the protocol layer and the engine exchange: plain parameters in, per-candidate deltas and
admission events out, and the engine's errors. Nothing here imports vLLM."""

from __future__ import annotations

from dataclasses import dataclass


class EngineUnavailable(RuntimeError):
    """The engine is dead, restarting or not started; the request was not (fully) served."""


class EngineRequestError(ValueError):
    """vLLM rejected the request's parameters."""


class SwapError(RuntimeError):
    """A hot swap did not happen; the engine serves the version it served before."""


@dataclass(frozen=True)
class Admitted:
    """The engine took a request on `version`'s weights: every token that follows (up to the
    next Admitted) comes from them. `restart`: a hot swap aborted the earlier attempt, whose
    output must be dropped; this attempt starts from scratch."""

    version: str
    restart: bool = False


@dataclass(frozen=True)
class SwapResult:
    """What `Engine.swap` did. Times in seconds: `validate_s` checking the checkpoint against
    the engine (still serving), `drain_s` waiting for (then aborting) requests in flight,
    `load_s` loading the weights; admission was closed for `paused_s`."""

    version: str
    previous: str
    validate_s: float
    drain_s: float
    load_s: float
    restarted: int
    """Requests aborted mid-generation and started again on the new version."""

    @property
    def paused_s(self) -> float:
        return self.drain_s + self.load_s


@dataclass(frozen=True)
class GenerationParams:
    """What one request asks of the engine, already validated by the protocol layer."""

    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0  # InstructGPT samples at temperature 1 (App. C.3)
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class ChoiceDelta:
    """New output of one candidate since its previous delta."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """None until the candidate's last delta: then "stop", "length" or "abort"."""


@dataclass
class EngineStats:
    """What the engine core reports each step (scheduler state), kept for metrics and tests."""

    steps: int = 0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    last_step_at: float = 0.0
    aborted_requests: int = 0
    """Requests this process aborted (client cancelled, deadline passed, or error)."""
