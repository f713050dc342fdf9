"""The TTFT probe: small streamed requests, not logged, one every probe_interval_s, for the time
to first token of a server idle and of one that trains and swaps beside it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.online_learning.client import Session

# Short requests for the TTFT probes. They go out with logging disabled: a logged prompt joins
# the next snapshot's PPO prompt set (feedback/export.py), and the probes are not the users'.
PROBE_PROMPTS: tuple[str, ...] = (
    "Name a colour.",
    "Say hello in French.",
    "What is two plus two?",
    "Name an animal that can fly.",
    "Give me a word that rhymes with cat.",
    "Name a fruit.",
)


@dataclass
class Probes:
    """TTFT samples of the streamed probes: [start time, TTFT s, version]."""

    samples: list[tuple[float, float, str]] = field(default_factory=list)
    restarts: int = 0

    def ttfts(self) -> list[float]:
        return [s[1] for s in self.samples]


async def probe(s: Session, i: int) -> tuple[float, str, int]:
    """One small streamed request: (TTFT, version, restarts). TTFT is the first token of the
    answer the client keeps: a restart (hot swap) drops what came before it."""
    req = s.request(
        PROBE_PROMPTS[i % len(PROBE_PROMPTS)],
        n=1, max_tokens=s.cfg.probe_max_tokens, temperature=0.0,
        user_id=f"probe-{i % s.cfg.users}", disable_logging=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    ttft: float | None = None
    version, restarts = "", 0
    stream = s.completion.StreamComplete(req, metadata=s.user_md, timeout=s.cfg.request_timeout_s)
    async for chunk in stream:
        if chunk.restarted:
            restarts += 1
            ttft = None
        if ttft is None and any(d.text for d in chunk.choices):
            ttft = time.perf_counter() - t0
        version = chunk.model_version or version
    return (ttft if ttft is not None else time.perf_counter() - t0), version, restarts


async def probe_loop(
    s: Session, probes: Probes, phase: str, *, count: int | None = None, stop: Any = None
) -> None:
    """Probes one after another, one every probe_interval_s, until `count` or `stop`."""
    step = s.cfg.probe_interval_s
    t_next = time.monotonic()
    i = 0
    while (count is None or i < count) and not (stop is not None and stop.is_set()):
        delay = t_next - time.monotonic()
        if delay > 0:
            if stop is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
        # A slow probe is not followed by a burst of catch-up probes.
        t_next = max(t_next + step, time.monotonic())
        started = time.time()
        try:
            ttft, version, restarts = await probe(s, i)
        except Exception as e:
            s.failures.add(phase, e)
        else:
            probes.samples.append((started, ttft, version))
            probes.restarts += restarts
        i += 1


async def idle_ttft(s: Session, idle: Probes) -> None:
    """Probes of a server with nothing else to do, after two warm-up requests and a pause, into
    `idle` (filled as they come, so a run stopped early keeps them)."""
    for i in range(2):  # warm-up: the first requests' one-off costs are not the idle figure
        try:
            await probe(s, i)
        except Exception as e:
            s.failures.add("warmup", e)
    await asyncio.sleep(s.cfg.idle_settle_s)
    await probe_loop(s, idle, "idle_probe", count=s.cfg.idle_probes)
