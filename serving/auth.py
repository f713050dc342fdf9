"""Who may call what, and who is calling: bearer keys from the `authorization` metadata.

User keys call completions and feedback; admin keys call everything, ModelService included (it
changes what every replica serves); labeller keys call only the labelling queue
(LabelingService and the /label page's API). Each key belongs to a named principal, the unit
that limits (serving/quotas.py) and records are kept by: `NAME:KEY` names it, a bare `KEY` gets
a stable name derived from its hash (`key-<8 hex>`), so logs, metrics and Redis never carry the
key itself.
Several keys may share a name (a key being rotated keeps its principal's limits and records).
A client-sent user_id is only a label within its principal. With no keys at all, every caller
is the one unnamed principal "". This module only decides; serving/errors.py turns a refusal
into its gRPC status.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping

from instructloop.v1 import labeling_pb2, model_pb2

ADMIN_SERVICES = (model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,)
"""Services only an admin key may call."""

LABELING_SERVICES = (labeling_pb2.DESCRIPTOR.services_by_name["LabelingService"].full_name,)
"""Services for labeller keys (and admin keys): the labelling queue. A labeller key calls
nothing else (no completions, no plain feedback, no ModelService), so a key handed to a person
to rank answers cannot spend the engine or write feedback outside its leased tasks; a user key
cannot take tasks (serving/labeling_service.py)."""

PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A principal's name: it appears in Redis keys, metric labels and logs, so it is short and
plain (no `:` in particular, which separates it from the key)."""

ANONYMOUS = ""
"""The principal of every caller while authentication is off."""


def derived_principal(key: str) -> str:
    """The name of a key given without one: stable across restarts and replicas, and not the
    key (8 hex digits of its SHA-256 identify it without revealing it)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_key_entry(entry: str) -> tuple[str, str]:
    """(principal, key) of one configured key: `NAME:KEY` or a bare `KEY`. A key that itself
    contains `:` must therefore be given with a name. Raises ValueError."""
    entry = entry.strip()
    name, sep, key = entry.partition(":")
    if not sep:
        if not entry:
            raise ValueError("empty key")
        return derived_principal(entry), entry
    if not PRINCIPAL_NAME.fullmatch(name):
        raise ValueError(
            f"principal name {name!r} is not valid: 1 to 64 of letters, digits, '.', '_', '-' "
            "(starting with a letter or digit), as in NAME:KEY"
        )
    if not key:
        raise ValueError(f"principal {name!r} has an empty key")
    return name, key


def _keyed(keys: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    """key -> principal; bare keys (a set, as older callers pass) get their derived names."""
    if isinstance(keys, Mapping):
        return dict(keys)
    return {k: derived_principal(k) for k in keys}


class Authenticator:
    """Bearer keys: user keys call completions and feedback, admin keys call everything.

    `users` and `admins`: key -> principal name, or plain keys (named by `derived_principal`).
    """

    def __init__(
        self,
        users: Mapping[str, str] | Iterable[str],
        admins: Mapping[str, str] | Iterable[str],
        labellers: Mapping[str, str] | Iterable[str] = (),
    ) -> None:
        user_keys, admin_keys = _keyed(users), _keyed(admins)
        # Admin entries first: a key given as both is an admin key.
        self._entries = [(k.encode(), "admin", p) for k, p in admin_keys.items()] + [
            (k.encode(), "user", p) for k, p in user_keys.items()
        ]
        # Labeller keys last (ServerConfig refuses a key that is also a user or admin key).
        self._entries += [(k.encode(), "labeller", p) for k, p in _keyed(labellers).items()]
        self._admin_prefixes = tuple(f"/{s}/" for s in ADMIN_SERVICES)
        self._labeling_prefixes = tuple(f"/{s}/" for s in LABELING_SERVICES)
        self.principals = frozenset(p for _, _, p in self._entries)
        """Every configured principal (bounded: the operator names them)."""

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def identify(self, header: str | None) -> tuple[str, str] | None:
        """(role, principal) of an `authorization` header value, role "admin", "user" or
        "labeller"; None
        for a missing or wrong key. Every configured key is compared, in constant time each."""
        if not header:
            return None
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        k = key.strip().encode()
        found: tuple[str, str] | None = None
        for entry, role, principal in self._entries:
            # No early exit: the time taken does not tell which key (or whether one) matched.
            if hmac.compare_digest(k, entry) and found is None:
                found = (role, principal)
        return found

    def role(self, header: str | None) -> str | None:
        """ "admin", "user", "labeller" or None (missing or wrong key)."""
        who = self.identify(header)
        return None if who is None else who[0]

    def principal(self, header: str | None) -> str | None:
        """The principal of an `authorization` header value (`Bearer <key>`): its name, ""
        while authentication is off, None for a missing or wrong key. For transports other
        than gRPC (the HTTP API), which check the role themselves."""
        if not self.enabled:
            return ANONYMOUS
        who = self.identify(header)
        return None if who is None else who[1]

    def check(
        self, method: str, metadata: Iterable[tuple[str, object]] | None
    ) -> tuple[str | None, str]:
        """(refusal, principal) of a call of `method` (`/package.Service/Rpc`) with this
        metadata. refusal: "key" (missing or wrong key), "admin" (a user or labeller key on an
        admin service), "labeller" (a user key on the labelling service), "labelling-only" (a
        labeller key on anything else) or None (allowed, by `principal`)."""
        if not self.enabled:
            return None, ANONYMOUS
        raw = None
        for key, value in metadata or ():
            if key == "authorization":
                raw = value
                break
        who = self.identify(raw if isinstance(raw, str) else None)
        if who is None:
            return "key", ANONYMOUS
        role, principal = who
        if role != "admin" and method.startswith(self._admin_prefixes):
            return "admin", principal
        if role == "user" and method.startswith(self._labeling_prefixes):
            return "labeller", principal
        if role == "labeller" and not method.startswith(self._labeling_prefixes):
            return "labelling-only", principal
        return None, principal

    def refusal(self, method: str, metadata: Iterable[tuple[str, object]] | None) -> str | None:
        """Why a call of `method` with this metadata is refused ("key", "admin") or None."""
        return self.check(method, metadata)[0]
