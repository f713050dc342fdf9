"""Limits on how much of a snapshot's preference data one source may supply.

A few percent of poisoned preferences is enough to steer a reward model (Best-of-Venom;
Rando & Tramèr's universal backdoors), and the cheapest way to supply them is one user, or one
API key, submitting far more rankings than anyone else. So the snapshot caps each source's share
of the rankings and comparisons it exports (the reward model's training data), keeps the first
ones each source gave (log order: later floods are what is dropped), and reports what it
dropped and how often each user agrees with the majority of the others on the same pairs.

A source is a user (within its principal, when the record names one) or a principal (the
named owner of an API key). The cap is a share: with counts c_u, the largest allowance m such
that m <= share * sum_u min(c_u, m). It applies once a snapshot has at least 1/share sources:
with fewer, one source's share is large by arithmetic, and holding them to equal shares would
cut a small team's most active labeller to the output of the least active one.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SourceCaps:
    """The snapshot's limits on one source's share of the preference data."""

    max_user_share: float = 0.1
    """Most of the rankings + comparisons one user may supply. Poisoning studies find effects
    from a few percent of the data; 10% still lets a small team's most active labeller do most
    of the work while keeping a single flooder from dominating."""

    max_principal_share: float = 1.0
    """Most one principal (an API key's owner) may supply. 1.0 (no cap) by default: a product
    usually calls with one app key that carries all of its users, which the user cap covers;
    operators with several keys of unequal trust lower it."""

    def __post_init__(self) -> None:
        for name in ("max_user_share", "max_principal_share"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v}")


def allowance(counts: Mapping[str, int], share: float) -> int | None:
    """The most items any one source may keep under `share` (see the module docstring); None
    where nobody needs cutting, or where there are too few sources for a share to apply."""
    if len(counts) * share < 1.0 - 1e-9:
        return None
    values = list(counts.values())

    def fits(m: int) -> bool:
        return m <= share * sum(min(c, m) for c in values)

    # fits() holds on an interval starting at 1 (a concave function minus a linear one; at 1 it
    # holds because there are at least 1/share sources).
    lo, hi = 1, max(values)
    if fits(hi):
        return None
    while lo < hi - 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass
class SourceLimiter:
    """Keeps each source within its allowance, in the order items are offered."""

    user_cap: int | None
    principal_cap: int | None
    kept_users: Counter[str] = field(default_factory=Counter)
    kept_principals: Counter[str] = field(default_factory=Counter)
    dropped_users: Counter[str] = field(default_factory=Counter)

    @classmethod
    def plan(cls, sources: list[tuple[str, str]], caps: SourceCaps) -> SourceLimiter:
        """From every (principal, user) pair of the items to come, one per item."""
        users = Counter(user_key(p, u) for p, u in sources)
        principals = Counter(p for p, _ in sources if p)
        return cls(
            allowance(users, caps.max_user_share),
            allowance(principals, caps.max_principal_share),
        )

    def admit(self, principal: str, user: str) -> bool:
        """Whether this item stays (and count it)."""
        key = user_key(principal, user)
        over_user = self.user_cap is not None and self.kept_users[key] >= self.user_cap
        over_principal = (
            principal != ""
            and self.principal_cap is not None
            and self.kept_principals[principal] >= self.principal_cap
        )
        if over_user or over_principal:
            self.dropped_users[key] += 1
            return False
        self.kept_users[key] += 1
        if principal:
            self.kept_principals[principal] += 1
        return True


def user_key(principal: str, user: str) -> str:
    """One user: a client-sent user_id is a label within its principal."""
    return f"{principal}/{user}" if principal else user


class MajorityAgreement:
    """Per user, how often their pairwise preferences agree with the majority of the other
    users who judged the same pair of responses (pairs with no strict majority among the
    others, or no others, are not counted). InstructGPT reports labeller-labeller agreement
    of about 73%; a user far below the rest is worth a look."""

    def __init__(self) -> None:
        # (completion, response a, response b) with a < b -> {user: +1 (a preferred) | -1}
        self._votes: dict[tuple[str, str, str], dict[str, int]] = defaultdict(dict)

    def add(self, completion_id: str, user: str, order: list[str], ranks: list[int]) -> None:
        rank = dict(zip(order, ranks, strict=True))
        ids = sorted(rank)
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                if rank[a] != rank[b]:
                    self._votes[(completion_id, a, b)][user] = 1 if rank[a] < rank[b] else -1

    def per_user(self) -> dict[str, dict[str, Any]]:
        """user -> {"judged": pairs compared against others, "agreement": share or None}."""
        agree: Counter[str] = Counter()
        judged: Counter[str] = Counter()
        for votes in self._votes.values():
            if len(votes) < 2:
                continue
            total = sum(votes.values())
            for user, v in votes.items():
                others = total - v
                if others == 0:
                    continue
                judged[user] += 1
                agree[user] += (others > 0) == (v > 0)
        return {
            u: {"judged": judged[u], "agreement": round(agree[u] / judged[u], 4)} for u in judged
        }
