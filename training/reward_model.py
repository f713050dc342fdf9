"""Stage 2 of InstructGPT: the reward model (§3.5, App. C.2).

r_θ(x, y) is the policy's backbone with a scalar head (transformers'
`AutoModelForSequenceClassification`, num_labels = 1), read at the last token of prompt + response
(the EOS that closes the response). `run_reward_model(cfg)`:

1. reads rankings (K responses per prompt, best first, equal ranks = ties);
2. trains with eq. 1, all C(K, 2) pairs of one prompt as ONE batch element: each of the K
   responses is forwarded once and the pairs are formed from the K scalars (the paper's point:
   cheaper, and no overfitting from seeing a response in many shuffled pairs);
3. one epoch, cosine decay to 10% (paper);
4. adds a bias so the reference responses (demonstrations) score a mean of 0 (paper), and stores
   the bias and the reference scores' std (for PPO's reward normalisation, as OpenRLHF does) in
   config.json and the manifest;
5. reports pairwise accuracy on held-out rankings (paper: about 70%).

Loading outside this module: `AutoModelForSequenceClassification.from_pretrained(dir)` gives the
raw head output; add `config.instructloop_reward_bias` (RewardScorer does). The config's
pad_token_id is set to a token other than EOS where the tokenizer has one, so transformers'
own pooling ("last non-pad token") also reads the reward at the EOS. vLLM serves the directory
as a pooling model (`LLM(dir, runner="pooling").classify(...)`): it returns σ(raw score), so the
reward is logit(p) + bias (tests/training/test_checkpoints.py checks this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructloop.training.checkpoint import CheckpointInfo, write_checkpoint
from instructloop.training.common import (
    DataError,
    MetricsLog,
    Progress,
    adamw,
    autocast,
    data_snapshot_of,
    default_log_path,
    encode_prompt_response,
    load_tokenizer,
    model_dtype_name,
    pad_batch,
    prepare_runtime,
    prompt_text_of,
    read_jsonl,
    resolve_device,
    resolve_model_path,
    set_seed,
    split_rows,
    train_model_kwargs,
)
from instructloop.training.config import ConfigError, RewardModelConfig, config_to_dict, validate
from instructloop.training.losses import (
    cosine_lr_factor,
    kway_ranking_loss,
    ordered_pairs,
    pairwise_accuracy,
)
from instructloop.training.trunk import freeze_lower, lower_hidden, pad_hidden, upper_hidden

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BIAS_KEY = "instructloop_reward_bias"
STD_KEY = "instructloop_reward_std"


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
    import torch

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


def reward_pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """A pad id that is not EOS, when the tokenizer has one (pad, then unk), so that
    transformers' "last non-pad token" pooling lands on the EOS that ends the response."""
    eos = tokenizer.eos_token_id
    for cand in (tokenizer.pad_token_id, getattr(tokenizer, "unk_token_id", None)):
        if cand is not None and cand != eos:
            return int(cand)
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)


def backbone_and_head(model: Any) -> tuple[Any, Any]:
    """(transformer body, scalar head) of a sequence-classification model, also through a peft
    wrapper (LoRA layers are injected in place, so calling the inner modules applies them)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.score


def token_scores(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    lower: torch.Tensor | None = None,
    n_frozen: int = 0,
):
    """The scalar head applied at every position: `[B, T]`. The RM reads the last real token; the
    critic (PPO's value model, initialised from the RM) reads every position. `lower`: the
    frozen trunk's output for these inputs (training/trunk.py), so only the top layers run."""
    body, head = backbone_and_head(model)
    if lower is not None:
        hidden = upper_hidden(body, lower, attention_mask, n_frozen)
    else:
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head(hidden).squeeze(-1).float()


def sequence_rewards(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    lower: torch.Tensor | None = None,
    n_frozen: int = 0,
):
    """r(x, y) per row: the head at the last real token (rows are right-padded): `[B]`."""
    import torch

    scores = token_scores(model, input_ids, attention_mask, lower=lower, n_frozen=n_frozen)
    last = attention_mask.sum(1) - 1
    return scores[torch.arange(scores.shape[0], device=scores.device), last]


class RewardScorer:
    """A trained reward model for scoring: r(x, y) + bias, optionally normalised by the std
    stored at training. Used by SFT selection, PPO and evaluation."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        max_length: int = 1024,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
        mixed_precision: str = "no",
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        self.path = str(path)
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(self.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.path, dtype=dtype or torch.float32
        ).to(self.device)
        self.model.eval().requires_grad_(False)
        self.bias = float(getattr(self.model.config, BIAS_KEY, 0.0) or 0.0)
        self.std = float(getattr(self.model.config, STD_KEY, 1.0) or 1.0)
        self.max_length = max_length
        self.batch_size = batch_size
        self.mixed_precision = mixed_precision
        """"bf16": score under bf16 autocast (PPO does when it trains under bf16)."""

    def score_ids(self, seqs: list[list[int]], *, normalize: bool = False) -> list[float]:
        """Rewards of token id sequences (prompt + response, EOS included when it ended)."""
        import torch

        out: list[float] = [0.0] * len(seqs)
        pad = int(self.model.config.pad_token_id or 0)
        # Batches of similar lengths pad less; each score goes back to its place.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        with torch.no_grad(), autocast(self.device, self.mixed_precision):
            for i in range(0, len(order), self.batch_size):
                rows = order[i : i + self.batch_size]
                ids, attn = pad_batch([seqs[j] for j in rows], pad, self.device)
                r = sequence_rewards(self.model, ids, attn).float() + self.bias
                if normalize:
                    r = r / self.std
                for j, v in zip(rows, r.tolist(), strict=True):
                    out[j] = v
        return out

    def score(self, prompts: list[str], responses: list[str], **kw: Any) -> list[float]:
        """Rewards of (prompt text, response text) pairs; each response gets an EOS appended."""
        seqs = [
            encode_prompt_response(self.tokenizer, p, r, self.max_length)[0]
            for p, r in zip(prompts, responses, strict=True)
        ]
        return self.score_ids(seqs, **kw)

    __call__ = score


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


def run_reward_model(cfg: RewardModelConfig) -> CheckpointInfo:
    """Train a reward model on `cfg.train_path` rankings; write it to `cfg.output_dir`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    validate(cfg)
    if not cfg.output_dir or not cfg.train_path:
        raise ConfigError("output_dir and train_path are required")
    if Path(cfg.output_dir).exists() and not cfg.overwrite:
        raise ConfigError(f"{cfg.output_dir} exists (set overwrite=true to replace it)")
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    prepare_runtime(cfg, device)
    model_path = resolve_model_path(cfg.model_path)
    tok = load_tokenizer(model_path)

    # -- data: ranking groups; held-out split by user when the rows say who ranked
    rows = load_rankings(cfg.train_path, tok, cfg.max_length, cfg.max_responses)
    if cfg.val_path:
        train = [g for _, g in rows]
        val = [g for _, g in load_rankings(cfg.val_path, tok, cfg.max_length, cfg.max_responses)]
    else:
        tr, va = split_rows([r for r, _ in rows], cfg.val_fraction, cfg.seed)
        by_id = {id(r): g for r, g in rows}
        train, val = [by_id[id(r)] for r in tr], [by_id[id(r)] for r in va]
    train = [g for g in train if ordered_pairs(g.ranks)]  # an all-tie group teaches nothing
    if not train:
        raise DataError(f"{cfg.train_path}: no ranking with at least one strict preference")
    if cfg.reference_path:
        from instructloop.training.sft import load_demonstrations

        reference = [d.ids for _, d in load_demonstrations(cfg.reference_path, tok, cfg.max_length)]
    else:
        best = [min(range(len(g.ranks)), key=lambda i: g.ranks[i]) for g in train]
        reference = [g.seqs[i] for g, i in zip(train, best, strict=True)]

    # -- model: backbone + scalar head (small random init as OpenRLHF: std 1/(d+1))
    pad_id = reward_pad_token_id(tok)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1, **train_model_kwargs(cfg, device)
    ).to(device)
    model.config.pad_token_id = pad_id
    model.config.use_cache = False
    _, head = backbone_and_head(model)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / (model.config.hidden_size + 1))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    body = backbone_and_head(model)[0]
    try:
        n_frozen = freeze_lower(body, cfg.trainable_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    lower = None
    if cfg.trainable_layers is not None:
        # The frozen trunk's output never changes: compute it once for every epoch.
        lower = trunk_outputs(model, train, pad_id, device, cfg, n_frozen)
    head_params = list(head.parameters())
    head_ids = {id(p) for p in head_params}
    body_params = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    opt = adamw(
        [
            {"params": body_params, "lr": cfg.lr},
            {"params": head_params, "lr": cfg.head_lr or cfg.lr},
        ],
        betas=cfg.adam_betas,
        weight_decay=cfg.weight_decay,
    )
    total_steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_lr_factor(s, total_steps, cfg.lr_final_fraction, cfg.warmup_steps)
    )

    log_path = default_log_path(cfg.output_dir, cfg.log_path)
    gen = torch.Generator().manual_seed(cfg.seed)
    micro = cfg.batch_size // cfg.grad_accum
    step = 0
    model.train()
    with MetricsLog(log_path, total=total_steps, desc="reward model", progress=cfg.progress) as ml:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(train), generator=gen).tolist()
            for start in range(0, len(order), cfg.batch_size):
                batch = [train[i] for i in order[start : start + cfg.batch_size]]
                loss_sum, correct, pairs = 0.0, 0, 0
                for m0 in range(0, len(batch), micro):
                    mb = batch[m0 : m0 + micro]
                    with autocast(device, cfg.mixed_precision):
                        rewards = group_rewards(
                            model, mb, pad_id, device, lower=lower, n_frozen=n_frozen
                        )
                    # InstructGPT eq. 1 per prompt; the batch loss is the mean over prompts.
                    losses = [
                        kway_ranking_loss(r, g.ranks) for r, g in zip(rewards, mb, strict=True)
                    ]
                    loss = torch.stack(losses).sum() / len(batch)
                    loss.backward()
                    loss_sum += loss.item()
                    for r, g in zip(rewards, mb, strict=True):
                        c, n = pairwise_accuracy(r.detach(), g.ranks)
                        correct, pairs = correct + c, pairs + n
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if math.isfinite(loss_sum) and torch.isfinite(grad_norm):
                    opt.step()
                opt.zero_grad(set_to_none=True)  # a non-finite step is skipped (NaN guard)
                sched.step()
                step += 1
                ml.log(
                    step,
                    {
                        "epoch": epoch,
                        "loss": loss_sum,
                        "accuracy": correct / max(pairs, 1),
                        "grad_norm": float(grad_norm),
                        "lr": sched.get_last_lr()[0],
                    },
                    show=("loss", "accuracy"),
                )
                ml.advance()

    # -- bias: reference responses score a mean of 0 (paper); their std for PPO normalisation
    model.eval()
    ref_scores = score_sequences(model, reference, pad_id, device, micro, cfg.mixed_precision)
    mean = sum(ref_scores) / len(ref_scores)
    var = sum((s - mean) ** 2 for s in ref_scores) / max(len(ref_scores) - 1, 1)
    bias, std = -mean, max(math.sqrt(var), 1e-6)

    val_metrics = evaluate_rankings(model, val, pad_id, device, micro, cfg.mixed_precision)
    metrics = {
        **val_metrics,
        "train_groups": len(train),
        "val_groups": len(val),
        "steps": total_steps,
        "reference_mean_before_bias": mean,
        "reference_std": std,
    }
    normalization = {"bias": bias, "mean": 0.0, "std": std, "n_reference": len(ref_scores)}
    return write_checkpoint(
        cfg.output_dir,
        model=model,
        tokenizer=tok,
        stage="rm",
        config=config_to_dict(cfg),
        metrics=metrics,
        parent_path=model_path,
        parent_version=cfg.parent_version,
        data_snapshot=cfg.data_snapshot or data_snapshot_of(cfg.train_path),
        save_dtype=cfg.save_dtype if cfg.save_dtype != "auto" else model_dtype_name(model_path),
        extra={"reward_normalization": normalization},
        extra_files={"metrics.jsonl": log_path},
        config_updates={BIAS_KEY: bias, STD_KEY: std},
        overwrite=cfg.overwrite,
    )


def trunk_outputs(
    model: Any,
    groups: list[RankingGroup],
    pad_id: int,
    device: torch.device,
    cfg: RewardModelConfig,
    n_frozen: int,
) -> dict[int, torch.Tensor]:
    """Each group's packed row through the frozen trunk, once: `[L, H]` by id(group).
    Length-sorted micro-batches, so little is padded."""
    body = backbone_and_head(model)[0]
    ordered = sorted(groups, key=lambda g: len(g.prompt) + sum(map(len, g.responses)))
    out: dict[int, torch.Tensor] = {}
    step = max(1, cfg.batch_size // cfg.grad_accum)
    progress = Progress("reward model: frozen trunk", len(ordered))
    for i in range(0, len(ordered), step):
        progress.update(i)
        chunk = ordered[i : i + step]
        packed = pack_groups(chunk, pad_id, device, model.config._attn_implementation)
        with autocast(device, cfg.mixed_precision):
            h = lower_hidden(
                body,
                packed.input_ids,
                packed.attention_mask,
                n_frozen,
                position_ids=packed.position_ids,
            )
        for row, (g, n) in enumerate(zip(chunk, packed.lengths, strict=True)):
            out[id(g)] = h[row, :n].clone()
    progress.update(len(ordered))
    return out


def score_sequences(
    model: PreTrainedModel,
    seqs: list[list[int]],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    mixed_precision: str = "no",
) -> list[float]:
    """Raw head outputs (no bias) of token id sequences."""
    import torch

    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, attn = pad_batch(seqs[i : i + batch_size], pad_id, device)
            with autocast(device, mixed_precision):
                out.extend(sequence_rewards(model, ids, attn).float().tolist())
    return out


def evaluate_rankings(
    model: PreTrainedModel,
    groups: list[RankingGroup],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    mixed_precision: str = "no",
) -> dict[str, float]:
    """Held-out pairwise accuracy (over strictly ordered pairs) and eq. 1 loss (mean over
    prompts that have pairs)."""
    import torch

    correct = pairs = 0
    losses: list[float] = []
    with torch.no_grad():
        for i in range(0, len(groups), max(1, batch_size)):
            mb = groups[i : i + batch_size]
            with autocast(device, mixed_precision):
                rewards = group_rewards(model, mb, pad_id, device)
            for r, g in zip(rewards, mb, strict=True):
                c, n = pairwise_accuracy(r.float(), g.ranks)
                correct, pairs = correct + c, pairs + n
                if n:
                    losses.append(kway_ranking_loss(r.float(), g.ranks).item())
    return {
        "val_accuracy": correct / pairs if pairs else float("nan"),
        "val_pairs": pairs,
        "val_loss": sum(losses) / len(losses) if losses else float("nan"),
    }


__all__ = [
    "BIAS_KEY",
    "STD_KEY",
    "RankingGroup",
    "RewardScorer",
    "evaluate_rankings",
    "load_rankings",
    "run_reward_model",
    "sequence_rewards",
    "token_scores",
]
