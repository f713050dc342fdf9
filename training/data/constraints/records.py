"""A constraint prompt as a record (IFEval's layout), its id, and its JSONL file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ConstraintPrompt:
    """One prompt with its verifiable instructions (IFEval's record layout, plus how it was
    built: the task template and each instruction's phrasing key, "" and () when unknown)."""

    id: str
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]
    subject: str = ""
    split: str = ""
    task: str = ""
    phrasings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "instruction_ids": list(self.instruction_ids),
            "kwargs": [dict(k) for k in self.kwargs],
            "subject": self.subject,
            "split": self.split,
            "task": self.task,
            "phrasings": list(self.phrasings),
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> ConstraintPrompt:
        try:
            ids = tuple(str(i) for i in row["instruction_ids"])
            kwargs = tuple(dict(k) for k in row["kwargs"])
            p = cls(
                id=str(row["id"]),
                prompt=str(row["prompt"]),
                instruction_ids=ids,
                kwargs=kwargs,
                subject=str(row.get("subject", "")),
                split=str(row.get("split", "")),
                task=str(row.get("task", "")),
                phrasings=tuple(str(k) for k in row.get("phrasings", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a constraint prompt row: {e!r}") from e
        if len(p.instruction_ids) != len(p.kwargs):
            raise ValueError(f"{p.id}: {len(p.instruction_ids)} ids but {len(p.kwargs)} kwargs")
        if p.phrasings and len(p.phrasings) != len(p.instruction_ids):
            n, m = len(p.instruction_ids), len(p.phrasings)
            raise ValueError(f"{p.id}: {n} ids but {m} phrasings")
        return p


def prompt_id(prompt: str, instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any]]) -> str:
    blob = json.dumps([prompt, list(instruction_ids), list(kwargs)], sort_keys=True)
    return "cp-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_prompts(path: str | Path, prompts: Iterable[ConstraintPrompt]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for p in prompts:
            f.write(json.dumps(p.to_json()) + "\n")
    tmp.replace(path)
    return path


def load_prompts(path: str | Path) -> list[ConstraintPrompt]:
    return list(iter_prompts(path))


def iter_prompts(path: str | Path) -> Iterator[ConstraintPrompt]:
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield ConstraintPrompt.from_json(json.loads(line))
            except (ValueError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e
