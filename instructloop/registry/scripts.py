"""The registry's changes, each one Lua script (atomic, no locks), and how their answers read.

Promote and rollback PUBLISH the new live version inside the same script, so no change goes
unannounced.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from instructloop.feedback.keys import RegistryKeys
from instructloop.registry.versions import (
    GateFailed,
    InvalidModelArgument,
    RegistryUnavailable,
    UnknownVersion,
    UnverifiedVersion,
    _check_gate,
    _check_metrics,
    _check_verify,
    _s,
)

# KEYS: 1 counter, 2 all (zset), 3 fingerprints; ARGV: 1 prefix, 2 fp key, 3 path, 4 parent,
# 5 source, 6 created_at, 7 data_snapshot, 8 gate, 9 fingerprint, 10 verified, 11.. metric name,
# value, ... A known directory and content keeps its version; a stronger verification than the
# one it has ("load" over "static" over none) is recorded on it.
_REGISTER = """
local known = redis.call('HGET', KEYS[3], ARGV[2])
if known then
  local vkey = ARGV[1] .. 'models:v:' .. known
  local had = redis.call('HGET', vkey, 'verified') or ''
  if (ARGV[10] == 'load' and had ~= 'load') or (ARGV[10] == 'static' and had == '') then
    redis.call('HSET', vkey, 'verified', ARGV[10])
  end
  return {'KNOWN', known}
end
if ARGV[4] ~= '' and redis.call('EXISTS', ARGV[1] .. 'models:v:' .. ARGV[4]) == 0 then
  return {'NOPARENT', ARGV[4]}
end
local n = redis.call('INCR', KEYS[1])
local v = 'v' .. n
redis.call('HSET', ARGV[1] .. 'models:v:' .. v, 'version', v, 'path', ARGV[3], 'parent', ARGV[4],
           'source', ARGV[5], 'created_at', ARGV[6], 'data_snapshot', ARGV[7], 'gate', ARGV[8],
           'fingerprint', ARGV[9], 'verified', ARGV[10])
for i = 11, #ARGV, 2 do
  redis.call('HSET', ARGV[1] .. 'models:m:' .. v, ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', KEYS[2], n, v)
redis.call('HSET', KEYS[3], ARGV[2], v)
return {'NEW', v}
"""

# KEYS: 1 live, 2 history, 3 version hash
# ARGV: 1 version, 2 now, 3 channel, 4 history max, 5 force ("1": even if its gate failed or it
# was not verified)
_PROMOTE = """
if redis.call('EXISTS', KEYS[3]) == 0 then return {'UNKNOWN'} end
if redis.call('HGET', KEYS[3], 'gate') == 'failed' and ARGV[5] ~= '1' then
  return {'GATE'}
end
local verified = redis.call('HGET', KEYS[3], 'verified')
if (not verified or verified == '') and ARGV[5] ~= '1' then
  return {'UNVERIFIED'}
end
local cur = redis.call('HGET', KEYS[1], 'version')
if cur == ARGV[1] then return {'SAME', cur} end
if cur then
  redis.call('LPUSH', KEYS[2], cur)
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'since', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return {'OK', cur or ''}
"""

# KEYS: 1 live, 2 history; ARGV: 1 now, 2 channel
_ROLLBACK = """
local prev = redis.call('LPOP', KEYS[2])
if not prev then return {'EMPTY'} end
local cur = redis.call('HGET', KEYS[1], 'version')
redis.call('HSET', KEYS[1], 'version', prev, 'since', ARGV[1])
redis.call('PUBLISH', ARGV[2], prev)
return {'OK', prev, cur or ''}
"""


class _Layout(RegistryKeys):
    """The registry's keys and the argument list of its register script."""

    __slots__ = ()

    @staticmethod
    def fp_field(path: Path, fp: str) -> str:
        """The field of the fingerprints hash that names a directory with this content."""
        return f"{path}\n{fp}"

    def register_args(
        self,
        path: Path,
        fp: str,
        *,
        source: str,
        parent: str | None,
        data_snapshot: str | None,
        metrics: dict[str, float] | None,
        gate: str | None,
        verified: str = "",
    ) -> tuple[list[str], list[str]]:
        if not source:
            raise InvalidModelArgument("source is required (e.g. 'init', 'sft', 'ppo')")
        args = [
            self.prefix,
            self.fp_field(path, fp),
            str(path),
            parent or "",
            source,
            repr(time.time()),
            data_snapshot or "",
            _check_gate(gate),
            fp,
            _check_verify(verified),
        ]
        for name, value in _check_metrics(metrics).items():
            args += [name, repr(value)]  # repr: the float's exact digits
        return [self.counter, self.all, self.fps], args


def _register_result(res: list[Any]) -> tuple[str, str]:
    status, value = _s(res[0]), _s(res[1])
    if status == "NOPARENT":
        raise UnknownVersion(f"parent version {value} is not registered")
    return status, value


def _promote_result(res: list[Any], version: str) -> None:
    status = _s(res[0])
    if status == "UNKNOWN":
        raise UnknownVersion(f"model version {version} is not registered")
    if status == "GATE":
        raise GateFailed(
            f"model version {version} failed its evaluation gate and cannot go live "
            "(force=True overrides)"
        )
    if status == "UNVERIFIED":
        raise UnverifiedVersion(
            f"model version {version} was not verified when it was registered; register its "
            "directory again to verify it (`instructloop model register PATH`), or force=True "
            "to promote it anyway"
        )


def _unavailable(e: Exception) -> RegistryUnavailable:
    return RegistryUnavailable(f"the model registry's Redis is unavailable: {e}")
