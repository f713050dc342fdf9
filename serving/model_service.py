"""ModelService: which version this replica serves (and whether it is pinned or on a
fallback), the registry's versions, and promotion and rollback (one atomic registry update
each, announced to every replica that follows the live version). Promotion refuses a version
whose gate failed or that was not verified when registered, unless `force`. Admin keys only
(serving/auth.py)."""

from __future__ import annotations

import contextlib
import logging

import grpc

from instructloop.registry import AsyncModelRegistry, RegistryError
from instructloop.serving.convert import model_version_pb, timestamp
from instructloop.serving.engine import Engine
from instructloop.serving.errors import invalid, store_failure
from instructloop.serving.replica import ServedModel
from instructloop.v1 import model_pb2, model_pb2_grpc

log = logging.getLogger("instructloop.serving")

SERVICE_NAME = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name


class ModelService(model_pb2_grpc.ModelServiceServicer):
    def __init__(
        self,
        registry: AsyncModelRegistry,
        engine: Engine,
        served: ServedModel,
        replica_id: str,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.served = served
        self.replica_id = replica_id

    async def _live_version(self) -> str:
        try:
            live = await self.registry.live()
        except RegistryError as e:
            raise store_failure(e) from None
        return live.version if live else ""

    async def _serving(self, live_version: str | None = None) -> model_pb2.ServingModel:
        mv = self.served.model
        with contextlib.suppress(RegistryError):
            mv = await self.registry.get(self.engine.model_version)  # fresh metrics and gate
        return model_pb2.ServingModel(
            model=model_version_pb(mv),
            serving_since=timestamp(max(self.served.since, self.engine.serving_since)),
            live_version=live_version if live_version is not None else await self._live_version(),
            replica_id=self.replica_id,
            pinned=self.served.pinned,
            fallback_reason=self.served.fallback.reason if self.served.fallback else "",
        )

    async def GetServingModel(
        self, request: model_pb2.GetServingModelRequest, context: grpc.aio.ServicerContext
    ) -> model_pb2.ServingModel:
        return await self._serving()

    async def ListModels(
        self, request: model_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> model_pb2.ListModelsResponse:
        try:
            models = await self.registry.list()
        except RegistryError as e:
            raise store_failure(e) from None
        return model_pb2.ListModelsResponse(
            models=[model_version_pb(m) for m in models], live_version=await self._live_version()
        )

    async def PromoteModel(
        self, request: model_pb2.PromoteModelRequest, context: grpc.aio.ServicerContext
    ) -> model_pb2.ServingModel:
        """One atomic registry update that announces itself; every following replica swaps."""
        if not request.version:
            raise invalid("version is required (e.g. 'v3'; ListModels shows them)")
        try:
            mv = await self.registry.promote(request.version, force=request.force)
        except RegistryError as e:
            raise store_failure(e) from None
        log.info("promoted %s (force=%s) through ModelService", mv.version, request.force)
        return await self._serving(live_version=mv.version)

    async def RollbackModel(
        self, request: model_pb2.RollbackModelRequest, context: grpc.aio.ServicerContext
    ) -> model_pb2.ServingModel:
        try:
            mv = await self.registry.rollback()
        except RegistryError as e:
            raise store_failure(e) from None
        log.info("rolled back to %s through ModelService", mv.version)
        return await self._serving(live_version=mv.version)
