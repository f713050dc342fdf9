"""The admission gate: which engine requests are in flight, and the gate a hot swap closes.

A request is admitted at one moment, on one version, and counts as in flight until its generator
ends. A swap closes the gate (new requests wait here, not in vLLM's queue), drains or aborts
what is in flight, and opens the gate once none is left (serving/engine.py: `Engine.swap`).
Plain asyncio; nothing here imports vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class InFlight:
    """One admitted engine request (one attempt), and how far it has got."""

    request_id: str
    max_tokens: int
    first_token_at: float | None = None
    tokens: int = 0
    """Tokens of its longest candidate so far."""
    swap_aborted: bool = False

    def rate(self, now: float) -> float | None:
        """Tokens per second per candidate since its first token; None before the second."""
        if self.first_token_at is None or self.tokens < 2 or now <= self.first_token_at:
            return None
        return (self.tokens - 1) / (now - self.first_token_at)

    def eta_s(self, now: float, fallback_rate: float | None) -> float | None:
        """Seconds until it reaches max_tokens at its pace so far (EOS may end it sooner);
        None when nothing tells."""
        rate = self.rate(now) or fallback_rate
        return None if not rate else max(0, self.max_tokens - self.tokens) / rate


class Admission:
    """The gate and the requests in flight behind it."""

    def __init__(self, on_change: Callable[[int], None] | None = None) -> None:
        self._on_change = on_change
        """Gets the number in flight whenever it changes (instructloop/activity.py)."""
        self._open = asyncio.Event()
        self._open.set()
        self._in_flight: dict[str, InFlight] = {}
        self._drained = asyncio.Event()
        self._drained.set()

    def __len__(self) -> int:
        return len(self._in_flight)

    async def wait_open(self) -> None:
        """Return once the gate is open (it is closed only while a swap drains and loads)."""
        await self._open.wait()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def enter(self, request_id: str, max_tokens: int) -> InFlight:
        slot = InFlight(request_id, max_tokens)
        self._in_flight[request_id] = slot
        self._drained.clear()
        self._changed()
        return slot

    def leave(self, request_id: str) -> None:
        del self._in_flight[request_id]
        if not self._in_flight:
            self._drained.set()
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self._in_flight))

    def hopeless(self, drain_timeout_s: float, now: float) -> list[InFlight]:
        """The requests that cannot reach their max_tokens within `drain_timeout_s` at their
        pace so far (the median pace stands in for those without one yet)."""
        slots = list(self._in_flight.values())
        rates = sorted(r for sl in slots if (r := sl.rate(now)))
        typical = rates[len(rates) // 2] if rates else None
        out = []
        for sl in slots:
            eta = sl.eta_s(now, typical)
            if eta is not None and eta > drain_timeout_s:
                out.append(sl)
        return out

    def not_aborted(self) -> list[InFlight]:
        return [sl for sl in self._in_flight.values() if not sl.swap_aborted]

    @staticmethod
    async def abort_for_swap(llm: Any, slots: list[InFlight]) -> int:
        """Abort these requests so that they restart on the new version; how many."""
        for slot in slots:
            slot.swap_aborted = True
            with contextlib.suppress(Exception):  # its generator counts the abort
                await llm.abort(slot.request_id)
        return len(slots)

    async def wait_drained(self, timeout_s: float) -> bool:
        """True once no request is in flight; False if some still are after `timeout_s`."""
        if not self._in_flight:
            return True
        try:
            await asyncio.wait_for(self._drained.wait(), timeout=max(timeout_s, 0.0))
        except TimeoutError:
            return not self._in_flight
        return True
