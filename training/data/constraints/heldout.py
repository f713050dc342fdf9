"""The held-out split of subjects: a stable hash of the subject, as the paper splits by user id."""

from __future__ import annotations

import hashlib

from instructloop.training.data.constraints.config import ConstraintConfig
from instructloop.training.data.constraints.templates import SUBJECTS, Split


def split_of(subject: str, cfg: ConstraintConfig | None = None) -> Split:
    """Train or held-out, by a stable hash of the subject (the split group)."""
    cfg = cfg or ConstraintConfig()
    h = hashlib.sha256(f"{cfg.split_salt}:{subject}".encode()).digest()
    return "heldout" if int.from_bytes(h[:8], "big") % 100 < cfg.heldout_percent else "train"


def subjects(split: Split, cfg: ConstraintConfig | None = None) -> list[str]:
    return [s for s in SUBJECTS if split_of(s, cfg) == split]
