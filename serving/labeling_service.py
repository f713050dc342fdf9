"""LabelingService: people rank the candidates of logged completions, one leased task at a time
(feedback/tasks.py keeps the queue). `Labeling` is the transport-neutral core, given the
caller's principal; `LabelingService` is its gRPC transport, and the /label page's HTTP API
(serving/labeling_http.py) calls the same servicer methods with the principal its key names.

Who may call: labeller and admin keys (serving/auth.py); a labeller key calls nothing else.
The labeller is the key's principal, or `user_id` within it when one key serves a team.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from instructloop.feedback.errors import FeedbackError
from instructloop.feedback.store import FeedbackStore
from instructloop.feedback.tasks import Labeller, QueueStats, Task, TaskConfig, TaskQueue
from instructloop.serving.config import ServerConfig
from instructloop.serving.errors import invalid, store_failure
from instructloop.serving.metrics import ServerMetrics
from instructloop.serving.quotas import current_principal
from instructloop.v1 import completion_pb2, labeling_pb2, labeling_pb2_grpc

SERVICE_NAME = labeling_pb2.DESCRIPTOR.services_by_name["LabelingService"].full_name

T = TypeVar("T")

FLAG_REASONS = {
    labeling_pb2.FLAG_REASON_UNSAFE: "unsafe",
    labeling_pb2.FLAG_REASON_BROKEN: "broken",
    labeling_pb2.FLAG_REASON_OTHER: "other",
}


def _timestamp(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def task_to_pb(task: Task) -> labeling_pb2.Task:
    rec = task.completion
    texts = {r.response_id: r for r in rec.responses}
    return labeling_pb2.Task(
        task_id=task.task_id,
        lease_id=task.lease_id,
        lease_expires=_timestamp(task.lease_expires),
        model_version=rec.model_version,
        prompt=rec.prompt or "",
        messages=[
            completion_pb2.ChatMessage(role=m.get("role", ""), content=m.get("content", ""))
            for m in rec.messages or ()
        ],
        candidates=[
            labeling_pb2.Candidate(
                response_id=rid, text=texts[rid].text, finish_reason=texts[rid].finish_reason
            )
            for rid in task.order
        ],
        labels_needed=task.labels_needed,
        labels_done=task.labels_done,
    )


def stats_to_pb(s: QueueStats) -> labeling_pb2.QueueStats:
    out = labeling_pb2.QueueStats(
        available=s.available,
        leased=s.leased,
        done=s.done,
        flagged=s.flagged,
        tasks=s.tasks,
        labels=s.labels,
        labels_last_hour=s.labels_last_hour,
        skips=s.skips,
        labels_per_task=s.labels_per_task,
        pairs_judged=s.pairs_judged,
        flags_by_reason=s.flags_by_reason,
    )
    if s.agreement is not None:
        out.agreement = s.agreement
    for name, f in sorted(s.labellers.items()):
        one = out.labellers.add(labeller=name, labels=f.labels, pairs_judged=f.pairs_judged)
        if f.agreement is not None:
            one.agreement = f.agreement
    return out


class Labeling:
    """The labelling API's one code path, whichever transport carries it: each method takes the
    caller's principal and the request message, and raises RpcFailure for what it refuses."""

    def __init__(self, queue: TaskQueue, metrics: ServerMetrics) -> None:
        self.queue = queue
        self.metrics = metrics

    async def _run(self, call: Awaitable[T], write: str = "") -> T:
        try:
            return await call
        except FeedbackError as e:
            if write and e.grpc_code_name == "UNAVAILABLE":
                self.metrics.redis_write_errors.labels(write).inc()
            raise store_failure(e) from None

    async def next_task(
        self, principal: str, request: labeling_pb2.NextTaskRequest
    ) -> labeling_pb2.NextTaskResponse:
        task = await self._run(
            self.queue.next_task(Labeller(principal, request.user_id)), "next_task"
        )
        if task is None:
            return labeling_pb2.NextTaskResponse(has_task=False)
        return labeling_pb2.NextTaskResponse(has_task=True, task=task_to_pb(task))

    async def submit_label(
        self, principal: str, request: labeling_pb2.SubmitLabelRequest
    ) -> labeling_pb2.SubmitLabelResponse:
        ack = await self._run(
            self.queue.submit(
                Labeller(principal, request.user_id),
                task_id=request.task_id,
                lease_id=request.lease_id,
                ranked_response_ids=list(request.ranked_response_ids),
                ranks=list(request.ranks) or None,
                rating=int(request.rating) or None,
                comment=request.comment,
            ),
            "submit_label",
        )
        if not ack.duplicate:
            self.metrics.feedback_records.labels("ranking").inc()
            if ack.rating_feedback_id:
                self.metrics.feedback_records.labels("rating").inc()
        return labeling_pb2.SubmitLabelResponse(
            feedback_id=ack.feedback_id,
            duplicate=ack.duplicate,
            created=_timestamp(ack.created_at),
            rating_feedback_id=ack.rating_feedback_id,
            labels_done=ack.labels_done,
        )

    async def skip_task(
        self, principal: str, request: labeling_pb2.SkipTaskRequest
    ) -> labeling_pb2.TaskReleased:
        first = await self._run(
            self.queue.skip(
                Labeller(principal, request.user_id),
                task_id=request.task_id,
                lease_id=request.lease_id,
            ),
            "skip_task",
        )
        return labeling_pb2.TaskReleased(task_id=request.task_id, duplicate=not first)

    async def flag_task(
        self, principal: str, request: labeling_pb2.FlagTaskRequest
    ) -> labeling_pb2.TaskReleased:
        reason = FLAG_REASONS.get(request.reason)
        if reason is None:
            raise invalid("a flag needs a reason: FLAG_REASON_UNSAFE, _BROKEN or _OTHER")
        first = await self._run(
            self.queue.flag(
                Labeller(principal, request.user_id),
                task_id=request.task_id,
                lease_id=request.lease_id,
                reason=reason,
                comment=request.comment,
            ),
            "flag_task",
        )
        return labeling_pb2.TaskReleased(task_id=request.task_id, duplicate=not first)

    async def queue_stats(self) -> labeling_pb2.QueueStats:
        return stats_to_pb(await self._run(self.queue.stats()))


class LabelingService(labeling_pb2_grpc.LabelingServiceServicer):
    """The gRPC transport of `Labeling`: the caller is the principal the guard bound."""

    def __init__(self, core: Labeling) -> None:
        self.core = core

    async def NextTask(
        self, request: labeling_pb2.NextTaskRequest, context: grpc.aio.ServicerContext
    ) -> labeling_pb2.NextTaskResponse:
        return await self.core.next_task(current_principal(), request)

    async def SubmitLabel(
        self, request: labeling_pb2.SubmitLabelRequest, context: grpc.aio.ServicerContext
    ) -> labeling_pb2.SubmitLabelResponse:
        return await self.core.submit_label(current_principal(), request)

    async def SkipTask(
        self, request: labeling_pb2.SkipTaskRequest, context: grpc.aio.ServicerContext
    ) -> labeling_pb2.TaskReleased:
        return await self.core.skip_task(current_principal(), request)

    async def FlagTask(
        self, request: labeling_pb2.FlagTaskRequest, context: grpc.aio.ServicerContext
    ) -> labeling_pb2.TaskReleased:
        return await self.core.flag_task(current_principal(), request)

    async def GetQueueStats(
        self, request: labeling_pb2.GetQueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> labeling_pb2.QueueStats:
        return await self.core.queue_stats()


def build(store: FeedbackStore, config: ServerConfig, metrics: ServerMetrics) -> Labeling:
    """The labelling core on the server's feedback store, with the server's queue settings."""
    tasks = TaskConfig(lease_s=config.label_lease_s, labels_per_task=config.labels_per_task)
    return Labeling(TaskQueue(store, tasks), metrics)
