"""Every Redis key the service uses, in one table: feedback, the model registry and the loop.

The layout is documented once, in docs/REDIS-KEYS.md. Feedback sits at the bottom of the layers,
so the registry (ground floor) and the training loop import their key names from here and
nobody else spells a key.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_KEY_PREFIX = "il:"
"""Every key starts with a prefix, so several deployments (or tests) can share one Redis."""

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
"""A Redis on this machine's standard port, database 0."""


@dataclass(frozen=True, slots=True)
class Keys:
    """Completions and feedback (feedback/store.py, feedback/export.py)."""

    prefix: str = DEFAULT_KEY_PREFIX

    def completion(self, completion_id: str) -> str:
        return f"{self.prefix}cmpl:{completion_id}"

    def response(self, response_id: str) -> str:
        return f"{self.prefix}resp:{response_id}"

    @property
    def response_prefix(self) -> str:
        return f"{self.prefix}resp:"

    @property
    def completion_log(self) -> str:
        return f"{self.prefix}log:completions"

    def feedback(self, feedback_id: str) -> str:
        return f"{self.prefix}fb:{feedback_id}"

    def idempotency(self, user_id: str, key: str, principal: str = "") -> str:
        # The user id's length first, so that ids containing ":" cannot collide. A user is a
        # label within its principal; without one (authentication off) the layout is the one
        # that came before principals, so earlier keys still answer replays.
        if principal:
            return f"{self.prefix}idem:p{len(principal)}:{principal}:{len(user_id)}:{user_id}:{key}"
        return f"{self.prefix}idem:{len(user_id)}:{user_id}:{key}"

    @property
    def feedback_log(self) -> str:
        return f"{self.prefix}log:feedback"

    def rate(self, user_id: str, window: int, principal: str = "") -> str:
        """One user's stored feedback in a window (within its principal, as `idempotency`)."""
        if principal:
            p = f"p{len(principal)}:{principal}"
            return f"{self.rate_prefix}{p}:{len(user_id)}:{user_id}:{window}"
        return f"{self.rate_prefix}{len(user_id)}:{user_id}:{window}"

    def principal_rate(self, principal: str, window: int) -> str:
        """One principal's stored feedback in a window, all its users together."""
        return f"{self.rate_prefix}fp{len(principal)}:{principal}:{window}"

    def quota(self, kind: str, principal: str, window: int) -> str:
        """One principal's completion requests or generated tokens (`kind`) in a window
        (serving/quotas.py)."""
        return f"{self.rate_prefix}q:{kind}:{len(principal)}:{principal}:{window}"

    @property
    def rate_prefix(self) -> str:
        return f"{self.prefix}rl:"

    @property
    def stats(self) -> str:
        return f"{self.prefix}stats"

    @property
    def snapshots(self) -> str:
        return f"{self.prefix}snapshots"


@dataclass(frozen=True, slots=True)
class RegistryKeys:
    """The model registry (instructloop/registry.py). Its register script builds the
    `models:v:<version>` and `models:m:<version>` keys from the prefix itself."""

    prefix: str = DEFAULT_KEY_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix:
            raise ValueError("prefix must not be empty")

    @property
    def counter(self) -> str:
        return f"{self.prefix}models:next"

    @property
    def all(self) -> str:
        return f"{self.prefix}models:all"

    @property
    def fps(self) -> str:
        return f"{self.prefix}models:fp"

    @property
    def live(self) -> str:
        return f"{self.prefix}models:live"

    @property
    def history(self) -> str:
        return f"{self.prefix}models:history"

    @property
    def events(self) -> str:
        return f"{self.prefix}models:events"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}models:replicas"

    def version(self, v: str) -> str:
        return f"{self.prefix}models:v:{v}"

    def metrics(self, v: str) -> str:
        return f"{self.prefix}models:m:{v}"


@dataclass(frozen=True, slots=True)
class LoopKeys:
    """The training loop (instructloop/training/loop/)."""

    prefix: str = DEFAULT_KEY_PREFIX

    def cycle(self, cycle_id: str) -> str:
        return f"{self.prefix}loop:cycle:{cycle_id}"

    @property
    def cycles(self) -> str:
        return f"{self.prefix}loop:cycles"

    @property
    def lock(self) -> str:
        return f"{self.prefix}loop:lock"

    @property
    def fence(self) -> str:
        return f"{self.prefix}loop:fence"

    def cancel(self, cycle_id: str) -> str:
        return f"{self.prefix}loop:cancel:{cycle_id}"

    def lease(self, cycle_id: str, step: str) -> str:
        return f"{self.prefix}loop:lease:{cycle_id}:{step}"

    def resume(self, cycle_id: str, step: str, attempt: int) -> str:
        return f"{self.prefix}loop:resume:{cycle_id}:{step}:{attempt}"

    @property
    def reward_model(self) -> str:
        return f"{self.prefix}loop:rm"

    @property
    def last_started(self) -> str:
        return f"{self.prefix}loop:last_started"

    @property
    def beat(self) -> str:
        return f"{self.prefix}loop:beat"

    @property
    def schedule(self) -> str:
        return f"{self.prefix}loop:schedule"


@dataclass(frozen=True, slots=True)
class LabelKeys:
    """The labelling task queue (feedback/tasks.py). Its scripts build `lab:task:<id>` and
    `lab:seen:<id>` from `task_prefix` and `seen_prefix` themselves, as the feedback script
    builds response keys."""

    prefix: str = DEFAULT_KEY_PREFIX

    def task(self, task_id: str) -> str:
        return f"{self.prefix}lab:task:{task_id}"

    def seen(self, task_id: str) -> str:
        return f"{self.prefix}lab:seen:{task_id}"

    @property
    def task_prefix(self) -> str:
        return f"{self.prefix}lab:task:"

    @property
    def seen_prefix(self) -> str:
        return f"{self.prefix}lab:seen:"

    @property
    def cursor(self) -> str:
        return f"{self.prefix}lab:cursor"

    @property
    def seq(self) -> str:
        return f"{self.prefix}lab:seq"

    @property
    def queue(self) -> str:
        return f"{self.prefix}lab:queue"

    @property
    def leased(self) -> str:
        return f"{self.prefix}lab:leased"

    @property
    def holders(self) -> str:
        return f"{self.prefix}lab:holders"

    @property
    def done(self) -> str:
        return f"{self.prefix}lab:done"

    @property
    def flagged(self) -> str:
        return f"{self.prefix}lab:flagged"

    @property
    def stats(self) -> str:
        return f"{self.prefix}lab:stats"

    @property
    def recent(self) -> str:
        return f"{self.prefix}lab:recent"
