"""Who may call what: bearer keys from the `authorization` metadata. User keys call completions
and feedback; admin keys call everything, ModelService included (it changes what every replica
serves). This module only decides; serving/errors.py turns a refusal into its gRPC status."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from instructloop.v1 import model_pb2

ADMIN_SERVICES = (model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,)
"""Services only an admin key may call."""


class Authenticator:
    """Bearer keys: user keys call completions and feedback, admin keys call everything."""

    def __init__(self, users: frozenset[str], admins: frozenset[str]) -> None:
        self.users = [k.encode() for k in users]
        self.admins = [k.encode() for k in admins]
        self._admin_prefixes = tuple(f"/{s}/" for s in ADMIN_SERVICES)

    @property
    def enabled(self) -> bool:
        return bool(self.users or self.admins)

    def role(self, header: str | None) -> str | None:
        """ "admin", "user" or None (missing or wrong key). Constant-time per key."""
        if not header:
            return None
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        k = key.strip().encode()
        is_admin = any([hmac.compare_digest(k, a) for a in self.admins])
        is_user = any([hmac.compare_digest(k, u) for u in self.users])
        return "admin" if is_admin else "user" if is_user else None

    def refusal(self, method: str, metadata: Iterable[tuple[str, object]] | None) -> str | None:
        """Why a call of `method` (`/package.Service/Rpc`) with this metadata is refused: "key"
        (missing or wrong key), "admin" (a user key on an admin service) or None (allowed)."""
        if not self.enabled:
            return None
        raw = None
        for key, value in metadata or ():
            if key == "authorization":
                raw = value
                break
        role = self.role(raw if isinstance(raw, str) else None)
        if role is None:
            return "key"
        if method.startswith(self._admin_prefixes) and role != "admin":
            return "admin"
        return None
