"""Evaluation of a policy: instruction following, win rate, and the alignment tax.

- IFEval-style accuracy on held-out constraint prompts (training/data/constraints/): prompt
  level (all instructions of a prompt met) and instruction level, IFEval's strict checkers.
- Win rate of the policy against a baseline on the same held-out prompts, judged by the
  constraints met and, when given, by a reward model (training/judges.py). Ties count half.
- LM loss on the held-out ptx corpus: the alignment tax (paper §4.3: PPO regresses on public NLP
  data sets, PPO-ptx recovers most of it). Token-weighted mean NLL with a transformers forward.

Answers are generated with vLLM (greedy by default, so a rerun gives the same answers).
`instructloop eval` (instructloop/cli/evaluate.py) prints `format_table(report)` and writes
the JSON.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructloop.training.data.constraints import (
    ConstraintPrompt,
    IFEvalAccuracy,
    accuracy,
    generate_prompts,
    paired_gain,
)
from instructloop.training.judges import ConstraintJudge, RewardModelJudge, WinRate, judge_win_rate
from instructloop.training.models import pad_batch
from instructloop.training.runtime import offline_hub, resolve_device

if TYPE_CHECKING:
    pass

DEFAULT_PTX_HELDOUT = Path(__file__).parent / "data" / "files" / "ptx_heldout.jsonl"


@dataclass(frozen=True)
class EvalConfig:
    """What `evaluate` measures and how (our defaults; the paper evaluates with humans)."""

    policy: str
    """The policy checkpoint (HF directory) to evaluate."""
    baseline: str | None = None
    """A second policy: win rate of `policy` over it, and its own metrics beside."""
    reward_model: str | None = None
    """A reward-model checkpoint: also judge the win rate by r(x, y)."""
    n_prompts: int = 200
    """Held-out constraint prompts (subjects never seen in training)."""
    prompt_seed: int = 0
    """Seed of the held-out prompt draw (same seed, same prompts)."""
    max_tokens: int = 128
    """Answer length limit."""
    temperature: float = 0.0
    """0 = greedy: deterministic answers, so two evaluations of one model agree."""
    ptx_path: str | None = None
    """Held-out ptx corpus ({"text"} jsonl); None = the shipped data/files/ptx_heldout.jsonl."""
    lm_max_length: int = 1024
    """Tokens per ptx text in the LM loss (longer texts are cut)."""
    batch_size: int = 8
    """Sequences per forward pass for LM loss and RM scoring."""
    device: str = "auto"
    """Device of the LM-loss and RM forwards ("auto": CUDA when available)."""

    def __post_init__(self) -> None:
        if self.n_prompts < 1:
            raise ValueError("n_prompts must be >= 1")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        for name in ("policy", "baseline", "reward_model"):
            p = getattr(self, name)
            if p is not None and not (Path(p) / "config.json").is_file():
                raise ValueError(f"{name}: {p} is not a model directory (no config.json)")
        if self.ptx_path is not None and not Path(self.ptx_path).is_file():
            raise ValueError(f"ptx_path: {self.ptx_path} does not exist")


@dataclass(frozen=True)
class LMLoss:
    """Token-weighted mean negative log-likelihood (nats per predicted token)."""

    nll: float
    n_tokens: int
    n_texts: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def to_json(self) -> dict[str, float | int]:
        return {
            "nll": self.nll,
            "perplexity": self.perplexity,
            "n_tokens": self.n_tokens,
            "n_texts": self.n_texts,
        }


def read_texts(path: str | Path) -> list[str]:
    """The "text" fields of a ptx.jsonl file (blank texts skipped)."""
    texts = []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                t = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a {{'text'}} row ({e!r})") from e
            if str(t).strip():
                texts.append(str(t))
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def lm_loss(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> LMLoss:
    """Σ_texts Σ_t −log p(x_t | x_<t) / (number of predicted tokens), over all `texts`.

    Each text is tokenised as the ptx term of PPO-ptx tokenises it (tokenizer defaults), cut to
    `max_length` tokens; the first token of a text has no prediction. Padding is masked out, so
    batching does not change the number.
    """
    import torch

    seqs = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError("no text of at least 2 tokens")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i : i + batch_size]
                ids, mask = pad_batch(chunk, 0, device)  # padding is masked out
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                tgt = ids[:, 1:]
                nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                m = mask[:, 1:].bool()
                total += float(nll[m].sum())
                count += int(m.sum())
    finally:
        model.train(was_training)
    return LMLoss(nll=total / count, n_tokens=count, n_texts=len(seqs))


def model_lm_loss(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    device: str = "auto",
    batch_size: int = 8,
    max_length: int = 1024,
) -> LMLoss:
    """`lm_loss` of a checkpoint, loaded in float32 (bf16 logits would blur a 2% difference)."""
    offline_hub()  # before transformers is first imported
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(resolve_device(device))
    try:
        return lm_loss(model, tok, texts, batch_size=batch_size, max_length=max_length)
    finally:
        del model
        gc.collect()


def generate_answers(
    model_dir: str | Path,
    prompts: Sequence[ConstraintPrompt],
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
) -> list[str]:
    """One answer per prompt from a fresh vLLM engine on `model_dir` (closed afterwards)."""
    from instructloop.training.data.generation import Sampler

    with Sampler(model_dir) as s:
        outs = s.sample(
            [p.prompt for p in prompts], n=1, temperature=temperature, max_tokens=max_tokens
        )
    return [o[0] for o in outs]


@dataclass
class ModelReport:
    path: str
    ifeval: IFEvalAccuracy
    ptx_lm_loss: LMLoss
    mean_reward: float | None = None
    mean_response_words: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ifeval": self.ifeval.to_json(),
            "ptx_lm_loss": self.ptx_lm_loss.to_json(),
            "mean_reward": self.mean_reward,
            "mean_response_words": self.mean_response_words,
        }


def evaluate(
    cfg: EvalConfig, *, progress: Callable[[str], None] = lambda _m: None
) -> dict[str, Any]:
    """Everything above for `cfg.policy` (and `cfg.baseline`); a JSON-ready report."""
    offline_hub()  # every model evaluated is a local directory
    t0 = time.time()
    prompts = generate_prompts(cfg.n_prompts, "heldout", seed=cfg.prompt_seed)
    texts = read_texts(cfg.ptx_path or DEFAULT_PTX_HELDOUT)
    rm = (
        RewardModelJudge(cfg.reward_model, device=cfg.device, batch_size=cfg.batch_size)
        if cfg.reward_model
        else None
    )
    reports: dict[str, ModelReport] = {}
    answers: dict[str, list[str]] = {}
    for name, path in (("policy", cfg.policy), ("baseline", cfg.baseline)):
        if path is None:
            continue
        progress(f"{name}: answering {len(prompts)} held-out prompts ({path})")
        ans = generate_answers(
            path, prompts, max_tokens=cfg.max_tokens, temperature=cfg.temperature
        )
        answers[name] = ans
        progress(f"{name}: LM loss on {len(texts)} held-out ptx texts")
        loss = model_lm_loss(
            path, texts, device=cfg.device, batch_size=cfg.batch_size, max_length=cfg.lm_max_length
        )
        reports[name] = ModelReport(
            path=str(path),
            ifeval=accuracy(prompts, ans),
            ptx_lm_loss=loss,
            mean_reward=(sum(s := rm.scores(prompts, ans)) / len(s)) if rm else None,
            mean_response_words=sum(len(a.split()) for a in ans) / len(ans),
        )
    out: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "models": {k: v.to_json() for k, v in reports.items()},
    }
    if "baseline" in answers:
        wr: dict[str, WinRate] = {
            "constraints": judge_win_rate(
                ConstraintJudge(), prompts, answers["policy"], answers["baseline"]
            ),
        }
        if rm is not None:
            wr["reward_model"] = judge_win_rate(rm, prompts, answers["policy"], answers["baseline"])
        out["win_rate"] = {k: v.to_json() for k, v in wr.items()}
        # Same prompts on both sides: the gain's paired standard error is the honest one.
        out["prompt_level_gain"] = paired_gain(
            reports["baseline"].ifeval, reports["policy"].ifeval
        ).to_json()
        pol, base = reports["policy"].ptx_lm_loss.nll, reports["baseline"].ptx_lm_loss.nll
        out["ptx_lm_loss_rise"] = (pol - base) / base
    out["samples"] = [
        {"prompt": p.prompt, **{k: v[i] for k, v in answers.items()}}
        for i, p in enumerate(prompts[:5])
    ]
    out["time_s"] = time.time() - t0
    return out


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of a report: one row per metric, one column per model."""
    models = report["models"]
    names = list(models)
    rows: list[tuple[str, list[str]]] = [
        ("prompt-level accuracy", [f"{models[n]['ifeval']['prompt_level']:.3f}" for n in names]),
        (
            "instruction-level accuracy",
            [f"{models[n]['ifeval']['instruction_level']:.3f}" for n in names],
        ),
        ("ptx LM loss (nats/token)", [f"{models[n]['ptx_lm_loss']['nll']:.4f}" for n in names]),
        ("mean answer words", [f"{models[n]['mean_response_words']:.1f}" for n in names]),
    ]
    if any(models[n]["mean_reward"] is not None for n in names):
        rows.append(("mean RM score", [f"{models[n]['mean_reward']:.3f}" for n in names]))
    width = max(len(r[0]) for r in [*rows, ("win rate (reward_model)", [])])
    lines = ["metric".ljust(width) + "".join(f"  {n:>10}" for n in names)]
    lines += [label.ljust(width) + "".join(f"  {v:>10}" for v in vals) for label, vals in rows]
    if gain := report.get("prompt_level_gain"):
        lines.append(
            f"{'prompt-level gain'.ljust(width)}  {gain['points']:>+10.1f}  "
            f"± {gain['standard_error_points']:.1f} points "
            f"(prompts gained/lost {gain['gained']}/{gain['lost']})"
        )
    for judge, w in report.get("win_rate", {}).items():
        lines.append(
            f"{f'win rate ({judge})'.ljust(width)}  {w['win_rate']:>10.3f}  ± {w['stderr']:.3f} "
            f"(W/T/L {w['wins']}/{w['ties']}/{w['losses']})"
        )
    if "ptx_lm_loss_rise" in report:
        lines.append(f"{'ptx LM loss rise'.ljust(width)}  {report['ptx_lm_loss_rise']:>+10.2%}")
    return "\n".join(lines)
