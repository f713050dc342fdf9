"""A stage's data files as the stage reads them: JSONL rows, the prompt text the policy sees,
prompt + response token ids, the train/validation split, and the tokenised demonstrations
(SFT's data, and the reward model's reference set).

Torch-free; a tokenizer is passed in where one is needed.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


class DataError(ValueError):
    """A training data file that cannot be used; the message names the file and line."""


def read_jsonl(path: str | Path, *, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """All objects of a JSONL file. Blank lines are skipped; anything else that is not a JSON
    object, or lacks a `required` key, is an error naming the line."""
    p = Path(path)
    try:
        # "\n" only: str.splitlines() also breaks at U+2028, U+0085, \x1c..., which JSON keeps
        # raw inside strings, so a sampled answer holding one would be cut in two.
        lines = p.read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise DataError(f"cannot read {p}: {e}") from e
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{p}:{n}: not JSON ({e})") from e
        if not isinstance(row, dict):
            raise DataError(f"{p}:{n}: expected a JSON object")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{p}:{n}: missing {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{p}: no rows")
    return rows


def data_snapshot_of(path: str | Path | None) -> str | None:
    """The export snapshot id of a data file: `snapshot_id` of the manifest.json beside it."""
    if not path:
        return None
    manifest = Path(path).parent / "manifest.json"
    try:
        return str(json.loads(manifest.read_text())["snapshot_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prompt_text_of(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, where: str = "") -> str:
    """The exact text the policy sees for a data row.

    - "prompt_text": used as is (the export's field: what the engine saw, template applied);
    - "messages", or "prompt" as a list of messages: the tokenizer's chat template with the
      assistant turn opened (add_generation_prompt);
    - "prompt" as a string: a raw completion prompt, used as is.
    """
    if isinstance(row.get("prompt_text"), str):
        return row["prompt_text"]
    messages = row.get("messages")
    if messages is None and isinstance(row.get("prompt"), list):
        messages = row["prompt"]
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise DataError(f"{where}: messages must be a list of {{role, content}}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{where}: chat messages given but the tokenizer has no chat template")
        return str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    raise DataError(f"{where}: no prompt (prompt_text, prompt or messages)")


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str,
    response: str,
    max_length: int,
    *,
    add_eos: bool = True,
) -> tuple[list[int], int]:
    """Token ids of prompt + response (+ EOS) and the prompt's length in tokens.

    The two parts are tokenised apart, so the boundary is exact (the loss mask and the reward's
    position depend on it) and matches what the engine does: it tokenises the prompt text and
    appends the tokens it samples. prompt_text already carries any special tokens (chat template),
    so none are added. When too long, the prompt is cut from the left: the response and the end
    of the prompt (the instruction just before the answer) matter most.
    """
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    if add_eos and tokenizer.eos_token_id is not None:
        r = [*r, tokenizer.eos_token_id]
    r = r[: max_length - 1]  # keep at least one prompt token
    keep = max_length - len(r)
    p = p[-keep:]
    return [*p, *r], len(p)


def split_rows(
    rows: list[dict[str, Any]], val_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train/validation split. When rows carry "user_id", whole users go to one side (the paper
    splits by user id, §3.2, so the validation score is on people the model has not seen);
    otherwise rows are split at random. At least one row goes to each side."""
    if len(rows) < 2:
        raise DataError("need at least 2 rows to hold some out for validation")
    users = [r.get("user_id") for r in rows]
    if all(u is not None for u in users) and len(set(users)) >= 2:
        ordered = sorted(set(map(str, users)), key=lambda u: zlib.crc32(f"{seed}:{u}".encode()))
        n_val = max(1, round(len(ordered) * val_fraction))
        val_users = set(ordered[:n_val])
        val = [r for r in rows if str(r["user_id"]) in val_users]
        train = [r for r in rows if str(r["user_id"]) not in val_users]
        if train and val:
            return train, val
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
    val_idx = set(idx[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_idx], [rows[i] for i in sorted(val_idx)]


def train_and_validation(
    rows: list[tuple[dict[str, Any], T]],
    val_rows: list[tuple[dict[str, Any], T]] | None,
    val_fraction: float,
    seed: int,
) -> tuple[list[T], list[T]]:
    """The training and validation examples of a stage: all of `rows` and all of `val_rows` (a
    validation file's) when there are some, else `rows` split by `split_rows`."""
    if val_rows is not None:
        return [x for _, x in rows], [x for _, x in val_rows]
    tr, va = split_rows([r for r, _ in rows], val_fraction, seed)
    by_id = {id(r): x for r, x in rows}
    return [by_id[id(r)] for r in tr], [by_id[id(r)] for r in va]


@dataclass(frozen=True)
class Demonstration:
    """One tokenised example: prompt + completion + EOS, and where the completion starts."""

    ids: list[int]
    prompt_len: int
    prompt_text: str


def load_demonstrations(
    path: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[tuple[dict[str, Any], Demonstration]]:
    """sft.jsonl rows with their tokenisation (prompt via `prompt_text_of`: chat template for
    messages). EOS ends each completion so the model learns to stop."""
    out = []
    for n, row in enumerate(read_jsonl(path, required=("completion",)), 1):
        if not isinstance(row["completion"], str) or not row["completion"]:
            raise DataError(f"{path}:{n}: completion must be a non-empty string")
        prompt = prompt_text_of(row, tokenizer, f"{path}:{n}")
        ids, plen = encode_prompt_response(tokenizer, prompt, row["completion"], max_length)
        out.append((row, Demonstration(ids, plen, prompt)))
    return out


__all__ = [
    "DataError",
    "Demonstration",
    "data_snapshot_of",
    "encode_prompt_response",
    "load_demonstrations",
    "prompt_text_of",
    "read_jsonl",
    "split_rows",
    "train_and_validation",
]
