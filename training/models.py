"""The models a stage loads and feeds: where they are, their tokenizer, the `from_pretrained`
keywords of a model in training, right-padded input batches, and residual dropout.

torch and transformers are imported inside the functions, so that importing a stage module
stays light until the stage runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from instructloop.training.config import StageConfig


def resolve_model_path(path: str) -> str:
    """ "" means the default policy, built once by `instructloop model init`."""
    if path:
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise ValueError(f"{p} is not a model directory (no config.json)")
        return str(p)
    from instructloop.paths import default_model_dir

    p = default_model_dir()
    if not (p / "config.json").is_file():
        raise ValueError(f"default model {p} is missing: run `instructloop model init`")
    return str(p)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The model directory's tokenizer, with a pad token (EOS when it has none: padding positions
    are always masked out, so the value never reaches a loss)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def attention_implementation(name: str, device: torch.device) -> str:
    """The `attn_implementation` to load trained models with (see StageConfig)."""
    if name != "auto":
        return name
    return "eager" if device.type == "cpu" else "sdpa"


def train_model_kwargs(cfg: StageConfig, device: torch.device) -> dict[str, Any]:
    """`from_pretrained` keywords of a model a stage trains (or runs beside one it trains):
    float32 master weights, the stage's attention kernels."""
    import torch

    return {
        "dtype": torch.float32,
        "attn_implementation": attention_implementation(cfg.attn_implementation, device),
    }


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to `[B, T]` ids and a `[B, T]` attention mask."""
    import torch

    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def add_residual_dropout(model: torch.nn.Module, p: float) -> list[Any]:
    """Dropout on every residual branch while the model trains (InstructGPT SFT: 0.2).

    GPT-2-style configs have the field (resid_pdrop) and get it set. Llama-family blocks add the
    attention and MLP outputs to the residual stream with no dropout at all, so here a forward
    hook drops out each `self_attn` / `mlp` block's output, which is what residual dropout is
    (GPT-2: dropout after attn.c_proj and mlp.c_proj). Hooks act only in train mode and are not
    saved, so checkpoints are unchanged. Returns the hook handles (call .remove() to undo).
    """
    import torch.nn.functional as F

    if p <= 0:
        return []
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "resid_pdrop"):
        # GPT-2 family: the architecture has residual dropout; its modules took the config's
        # value at construction, so set both.
        config.resid_pdrop = p
        for mod_name, mod in model.named_modules():
            if mod_name.endswith(("attn.resid_dropout", "mlp.dropout")) and hasattr(mod, "p"):
                mod.p = p
        return []

    def hook(module: Any, _inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    handles = []
    for mod_name, mod in model.named_modules():
        leaf = mod_name.rsplit(".", 1)[-1]
        if leaf in ("self_attn", "mlp") and ".layers." in f".{mod_name}":
            handles.append(mod.register_forward_hook(hook))
    return handles


__all__ = [
    "add_residual_dropout",
    "attention_implementation",
    "load_tokenizer",
    "pad_batch",
    "resolve_model_path",
    "train_model_kwargs",
]
