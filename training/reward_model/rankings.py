"""The reward model's data: K-way rankings, one prompt's K responses packed into one row, and
their rewards from one forward pass.

Eq. 1 of InstructGPT takes all C(K, 2) pairs of a prompt as one batch element: each of the K
responses is forwarded once and the pairs are formed from the K scalars. Packing goes one step
further: the prompt is forwarded once for the K responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from instructloop.training.datafiles import (
    DataError,
    encode_prompt_response,
    prompt_text_of,
    read_jsonl,
)
from instructloop.training.reward_model.head import backbone_and_head
from instructloop.training.trunk import pad_hidden, upper_hidden

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class RankingGroup:
    """One prompt's K responses, tokenised, with their ranks (1 = best, equal = tie). The
    prompt's tokens are held once: every response of the group is scored after them."""

    prompt: list[int]
    responses: list[list[int]]  # each closed by EOS
    ranks: list[int]
    prompt_text: str

    @property
    def seqs(self) -> list[list[int]]:
        """prompt + response, per response."""
        return [self.prompt + r for r in self.responses]


def load_rankings(
    path: str, tokenizer: PreTrainedTokenizerBase, max_length: int, max_responses: int
) -> list[tuple[dict[str, Any], RankingGroup]]:
    """rankings.jsonl rows (K >= 2 responses with ranks) and their tokenisation."""
    out = []
    for n, row in enumerate(read_jsonl(path, required=("responses",)), 1):
        where = f"{path}:{n}"
        responses = row["responses"]
        ranks = row.get("ranks") or list(range(1, len(responses) + 1))  # best first, no ties
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{where}: a ranking needs at least 2 responses")
        if len(ranks) != len(responses) or not all(isinstance(r, int) for r in ranks):
            raise DataError(f"{where}: ranks must be one integer per response")
        if not all(isinstance(r, str) for r in responses):
            raise DataError(f"{where}: responses must be strings")
        # Keep the best max_responses (a stable sort keeps the file's order among ties).
        keep = sorted(range(len(responses)), key=lambda i: ranks[i])[:max_responses]
        prompt = prompt_text_of(row, tokenizer, where)
        enc = [encode_prompt_response(tokenizer, prompt, responses[i], max_length) for i in keep]
        # One prompt for the group, cut (only past max_length) so that the longest response fits.
        n_prompt = min(n for _, n in enc)
        group = RankingGroup(
            prompt=enc[0][0][: enc[0][1]][len(enc[0][0][: enc[0][1]]) - n_prompt :],
            responses=[ids[n:] for ids, n in enc],
            ranks=[int(ranks[i]) for i in keep],
            prompt_text=prompt,
        )
        out.append((row, group))
    return out


@dataclass(frozen=True)
class PackedGroups:
    """Ranking groups packed one row each: the prompt once, then its K responses, every response
    attending to the prompt and to itself only, with positions that go on from the prompt's end
    as if it stood alone after it. So a response's reward is exactly the one it gets scored
    alone, and the prompt's tokens are computed once for the K responses, not K times."""

    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, 1, L, L]: bool (True = attend), or additive for eager
    lasts: list[list[int]]  # per group, the column of each response's last token (its EOS)
    lengths: list[int]  # per group, its packed length


def pack_groups(
    groups: list[RankingGroup], pad_id: int, device: torch.device, attn_implementation: str
) -> PackedGroups:
    """Pack `groups` (one row each, right-padded to the longest). The mask is what the model's
    attention takes as is: bool for sdpa, additive float (0 / dtype min) for eager."""
    rows, segs, pos, lasts = [], [], [], []
    for g in groups:
        ids, seg, p, last = list(g.prompt), [-1] * len(g.prompt), list(range(len(g.prompt))), []
        for k, r in enumerate(g.responses):
            ids += r
            seg += [k] * len(r)
            p += range(len(g.prompt), len(g.prompt) + len(r))
            last.append(len(ids) - 1)
        rows.append(ids), segs.append(seg), pos.append(p), lasts.append(last)
    width = max(len(r) for r in rows)
    pad_seg = -2  # padding: attends to itself only (a row that attends to nothing is NaN)

    def padded(xs: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([x + [fill] * (width - len(x)) for x in xs], device=device)

    seg_t = padded(segs, pad_seg)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    same = seg_t[:, :, None] == seg_t[:, None, :]
    to_prompt = (seg_t[:, None, :] == -1) & (seg_t[:, :, None] != pad_seg)
    allowed = (causal & (same | to_prompt))[:, None]
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, device=device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min
        )
    elif attn_implementation == "sdpa":
        mask = allowed
    else:
        raise ValueError(
            f"packed ranking groups need eager or sdpa attention, not {attn_implementation}"
        )
    return PackedGroups(
        input_ids=padded(rows, pad_id),
        position_ids=padded(pos, 0),
        attention_mask=mask,
        lasts=lasts,
        lengths=[len(r) for r in rows],
    )


def group_rewards(
    model: Any,
    groups: list[RankingGroup],
    pad_id: int,
    device: torch.device,
    *,
    lower: dict[int, torch.Tensor] | None = None,
    n_frozen: int = 0,
):
    """One forward pass over all groups, packed (each prompt once, each response once): the
    rewards `[K]` per group. `lower`: each group's cached trunk output (`[L, H]` of its packed
    row, `trunk_outputs`), by id(group)."""
    body, head = backbone_and_head(model)
    packed = pack_groups(groups, pad_id, device, model.config._attn_implementation)
    kw = {"attention_mask": packed.attention_mask, "position_ids": packed.position_ids}
    if lower is not None:
        trunk = pad_hidden([lower[id(g)] for g in groups])
        hidden = upper_hidden(body, trunk, n_frozen=n_frozen, **kw)
    else:
        hidden = body(input_ids=packed.input_ids, **kw).last_hidden_state
    out = []
    for b, last in enumerate(packed.lasts):
        out.append(head(hidden[b, last]).squeeze(-1).float())
    return out


__all__ = ["PackedGroups", "RankingGroup", "group_rewards", "load_rankings", "pack_groups"]
