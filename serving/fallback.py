"""Start-up of a replica that follows the registry: the live version, or if it will not load,
the newest version that does.

Why: a bad promotion (forced past verification, or files damaged after it) used to make every
replica that started afterwards exit, so one mistake took the whole service down at its next
restart. Triton's rule is that a failed load keeps the old model serving; a replica that starts
has no old model, so it picks the one it would have kept: the most recently live version that
loads, then the other versions, newest first. A version whose gate failed is never a fallback
(only an operator's force makes it live). It serves that version, says so in its log, in
GetServingModel (fallback_reason), in the replica report and in `instructloop_serving_fallback`
(deploy/prometheus/alerts.yml pages on it), and its hot swapper keeps trying the live version.

A candidate is checked from its files first (instructloop/registry/verify.py, and its
fingerprint against the registered one), which refuses a broken checkpoint in seconds; only
then is an engine started on it, and an engine that does not start counts as a failure too.
A replica pinned with `--model` never falls back: it serves what it was told or exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from instructloop.errors import ConfigError
from instructloop.registry import AsyncModelRegistry, CheckpointRejected, ModelVersion, fingerprint
from instructloop.registry.verify import verify_files
from instructloop.serving.config import ServerConfig
from instructloop.serving.engine import Engine
from instructloop.serving.replica import Fallback

log = logging.getLogger("instructloop.serving")

MAX_ENGINE_FAILURES = 3
"""Engine starts that may fail before the replica gives up: each costs up to a minute, and
checkpoints that pass the file checks yet fail in the engine this often point at the machine
(memory, the engine's install), which another version will not fix."""


@dataclass(frozen=True)
class Started:
    engine: Engine
    model: ModelVersion
    fallback: Fallback | None
    """None when `model` is the version the replica started for."""


async def candidates(registry: AsyncModelRegistry, wanted: ModelVersion) -> list[ModelVersion]:
    """`wanted` first, then the previously live versions (most recent first), then every other
    version, newest first; none whose gate failed."""
    versions = await registry.list()
    by_name = {m.version: m for m in versions}
    order = [wanted.version, *await registry.history(), *(m.version for m in versions)]
    out: list[ModelVersion] = []
    for name in dict.fromkeys(order):
        mv = wanted if name == wanted.version else by_name.get(name)
        if mv is not None and (mv is wanted or mv.gate != "failed"):
            out.append(mv)
    return out


def precheck(mv: ModelVersion, check_fingerprint: bool) -> str | None:
    """Why `mv` will not load, from its files; None if they look right."""
    path = Path(mv.path)
    if not path.is_dir():
        return f"{path} does not exist"
    try:
        verify_files(path)
        if check_fingerprint and mv.fingerprint and fingerprint(path) != mv.fingerprint:
            return f"{path} changed since {mv.version} was registered (fingerprint differs)"
    except CheckpointRejected as e:
        return str(e)
    except Exception as e:  # an unreadable file raises what its reader raises
        return f"{type(e).__name__}: {e}"
    return None


async def start_loadable(
    registry: AsyncModelRegistry,
    config: ServerConfig,
    wanted: ModelVersion,
    progress: Callable[[str], None],
) -> Started:
    """A started engine on `wanted`, or on the first candidate that loads. Raises ConfigError
    (with every candidate's reason) when none does."""
    failures: list[tuple[str, str]] = []
    engine_failures = 0
    for mv in await candidates(registry, wanted):
        reason = await asyncio.to_thread(precheck, mv, config.swap_verify_fingerprint)
        if reason is None:
            engine = Engine(mv.path, config, model_version=mv.version)
            try:
                await engine.start(progress)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(engine.shutdown)
                raise
            except Exception as e:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(engine.shutdown)
                engine_failures += 1
                text = " ".join(str(e).split())[:300]
                reason = f"the engine did not start on it ({type(e).__name__}: {text})"
            else:
                return Started(engine, mv, _fallback(wanted, mv, failures, progress))
        log.error("model %s (%s) will not load: %s", mv.version, mv.path, reason)
        progress(f"model: {mv.version} will not load: {reason}")
        failures.append((mv.version, reason))
        if engine_failures >= MAX_ENGINE_FAILURES:
            break
    raise ConfigError("no registered version loads: " + "; ".join(f"{v}: {r}" for v, r in failures))


def _fallback(
    wanted: ModelVersion,
    got: ModelVersion,
    failures: list[tuple[str, str]],
    progress: Callable[[str], None],
) -> Fallback | None:
    if got.version == wanted.version:
        return None
    reason = next(r for v, r in failures if v == wanted.version)
    log.error(
        "FALLBACK: the live version %s will not load (%s); serving %s (%s) instead until the "
        "live version is fixed, rolled back or replaced",
        wanted.version, reason, got.version, got.path,
    )  # fmt: skip
    progress(f"model: FALLBACK to {got.version}: the live version {wanted.version} will not load")
    return Fallback(wanted.version, reason)
