"""The Redis key layout (one place, shared by the store and the export).

With prefix `p` (default "il:"):

| key                         | type   | holds                                                 |
|-----------------------------|--------|-------------------------------------------------------|
| `p cmpl:<completion_id>`    | hash   | `record` (CompletionRecord JSON), `r:<response_id>`   |
|                             |        | -> index for each of its responses                    |
| `p resp:<response_id>`      | string | the completion id (response -> completion index)      |
| `p log:completions`         | stream | `completion_id`, one entry per logged completion      |
| `p fb:<feedback_id>`        | hash   | feedback_id, kind, user_id, idempotency_key,          |
|                             |        | completion_id, created_at, data (kind-specific JSON)  |
| `p idem:<n>:<user>:<key>`   | hash   | feedback_id, created_at, digest, completion_id        |
| `p log:feedback`            | stream | feedback_id, kind, completion_id: the order of all    |
|                             |        | feedback; an export is "everything up to stream id X" |
| `p rl:<n>:<user>:<window>`  | string | the user's stored feedback in one rate-limit window   |
| `p stats`                   | hash   | counters: completions, feedback:<kind>                |
| `p snapshots`               | hash   | snapshot id -> export summary JSON (its stream range) |

`<n>` is the length of the user id, so that ids containing ":" cannot collide
(user "a:b" with key "c" vs user "a" with key "b:c").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "il:"

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

    def idempotency(self, user_id: str, key: str) -> str:
        return f"{self.prefix}idem:{len(user_id)}:{user_id}:{key}"

    @property
    def feedback_log(self) -> str:
        return f"{self.prefix}log:feedback"

    def rate(self, user_id: str, window: int) -> str:
        return f"{self.rate_prefix}{len(user_id)}:{user_id}:{window}"

    @property
    def rate_prefix(self) -> str:
        return f"{self.prefix}rl:"

    @property
    def stats(self) -> str:
        return f"{self.prefix}stats"

    @property
    def snapshots(self) -> str:
        return f"{self.prefix}snapshots"
