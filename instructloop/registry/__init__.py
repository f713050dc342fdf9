"""The model registry (Redis): every checkpoint the service knows, its lineage, and which one is
live. Serving (ModelService, hot swap) and training (register, gate, promote) share it.

Two classes with the same methods: `ModelRegistry` (sync redis-py; training, CLI, tests) and
`AsyncModelRegistry` (redis.asyncio; the gRPC server). Every change is one Lua script, so it is
atomic and needs no locks; promote and rollback PUBLISH the new live version (the plain version
string, e.g. "v3") on `<prefix>models:events` inside the same script, so no change goes
unannounced. A server subscribes to that channel and re-reads `live()` on each message (and once
at start, since Pub/Sub keeps nothing for a subscriber that was away).

Every registration verifies the checkpoint first (instructloop/registry/verify.py: under the
checkpoint roots, weights whole and of config.json's architecture, tokenizer and chat template
present) and records how; promote refuses an unverified version unless forced
(docs/CHECKPOINTS.md).

Keys: docs/REDIS-KEYS.md (`feedback.keys.RegistryKeys`).
"""

from instructloop.registry.aio import AsyncModelRegistry
from instructloop.registry.sync import ModelRegistry
from instructloop.registry.verify import CheckpointSummary, verify_checkpoint
from instructloop.registry.versions import (
    GATES,
    HISTORY_MAX,
    REPLICA_STALE_S,
    VERIFICATIONS,
    CheckpointRejected,
    GateFailed,
    InvalidModelArgument,
    LiveModel,
    ModelPathError,
    ModelVersion,
    NoPreviousVersion,
    RegistryError,
    RegistryUnavailable,
    UnknownVersion,
    UnverifiedVersion,
    fingerprint,
)

__all__ = [
    "GATES",
    "HISTORY_MAX",
    "REPLICA_STALE_S",
    "VERIFICATIONS",
    "AsyncModelRegistry",
    "CheckpointRejected",
    "CheckpointSummary",
    "GateFailed",
    "InvalidModelArgument",
    "LiveModel",
    "ModelPathError",
    "ModelRegistry",
    "ModelVersion",
    "NoPreviousVersion",
    "RegistryError",
    "RegistryUnavailable",
    "UnknownVersion",
    "UnverifiedVersion",
    "fingerprint",
    "verify_checkpoint",
]
