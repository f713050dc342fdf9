"""Train only the top layers of a decoder: a frozen lower trunk, run once per input.

With `trainable_layers = N`, the token embeddings and all but the top N decoder layers are
frozen (trlx calls this `num_layers_unfrozen`). Nothing below the first trainable layer needs a
backward pass, and because the trunk's weights never change, its output for a given input is the
same at every pass: the reward model computes it once per response for all its epochs, and PPO
once per rollout for all its passes (old log-probs, values, every PPO epoch). On a CPU, where a
step is all forward and backward passes, that is most of the cost: with 10 of SmolLM2's 30
layers trainable, a training pass over a cached trunk runs a third of the layers, forward and
backward.

The split relies on what Hugging Face decoders of the Llama family (Llama, Mistral, Qwen2,
SmolLM, ...) share: a body with `embed_tokens`, a `layers` ModuleList and a final `norm`, whose
forward takes `inputs_embeds`. `lower_hidden` runs the bottom layers without the final norm;
`upper_hidden` feeds that residual stream back in as `inputs_embeds` and runs the top layers and
the norm: together exactly the full forward. Models of another shape get a clear error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def decoder_stack(body: Any) -> tuple[Any, Any]:
    """(`layers` ModuleList, final `norm`) of a decoder body; ValueError when it has neither."""
    layers = getattr(body, "layers", None)
    norm = getattr(body, "norm", None)
    if layers is None or norm is None or not hasattr(body, "embed_tokens"):
        raise ValueError(
            f"trainable_layers needs a Llama-style decoder (embed_tokens, layers, norm); "
            f"{type(body).__name__} is not one"
        )
    return layers, norm


def freeze_lower(body: Any, trainable_layers: int | None) -> int:
    """Freeze the embeddings and all but the top `trainable_layers` layers of `body`; return
    how many layers are frozen (0 when `trainable_layers` is None: everything trains)."""
    if trainable_layers is None:
        return 0
    layers, _ = decoder_stack(body)
    if not 1 <= trainable_layers <= len(layers):
        raise ValueError(f"trainable_layers must be in [1, {len(layers)}], not {trainable_layers}")
    n_frozen = len(layers) - trainable_layers
    if n_frozen:
        # The embeddings too: with them trainable the backward would run through every layer.
        body.embed_tokens.requires_grad_(False)
        for layer in layers[:n_frozen]:
            layer.requires_grad_(False)
    return n_frozen


def same_trunk(a: Any, b: Any, n_frozen: int) -> bool:
    """Whether two bodies hold the same weights in their embeddings and `n_frozen` bottom
    layers (then one trunk output serves both: a critic or reward model trained with the same
    frozen trunk as the policy)."""
    import torch

    try:
        la, lb = decoder_stack(a)[0], decoder_stack(b)[0]
    except ValueError:
        return False
    if len(la) < n_frozen or len(lb) < n_frozen:
        return False
    pairs = [(a.embed_tokens, b.embed_tokens), *zip(la[:n_frozen], lb[:n_frozen], strict=True)]
    for ma, mb in pairs:
        pa, pb = dict(ma.named_parameters()), dict(mb.named_parameters())
        if pa.keys() != pb.keys():
            return False
        if not all(torch.equal(pa[k], pb[k]) for k in pa):
            return False
    return True


@contextlib.contextmanager
def _only(body: Any, start: int, end: int, *, final_norm: bool) -> Iterator[None]:
    """Within the block, `body` runs layers [start, end) (and its norm only if `final_norm`)."""
    import torch

    layers, norm = decoder_stack(body)
    body.layers = torch.nn.ModuleList(list(layers)[start:end])
    if not final_norm:
        body.norm = torch.nn.Identity()
    try:
        yield
    finally:
        body.layers, body.norm = layers, norm


def lower_hidden(
    body: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_frozen: int,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The residual stream after the `n_frozen` bottom layers `[B, T, H]`, without gradients
    (with `n_frozen` = 0: the token embeddings). `attention_mask` and `position_ids` go to the
    body as they are (a 2-D padding mask, or a packed 4-D one)."""
    import torch

    with torch.no_grad():
        if n_frozen == 0:
            return body.embed_tokens(input_ids)
        with _only(body, 0, n_frozen, final_norm=False):
            out = body(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
    return out.last_hidden_state


def upper_hidden(
    body: Any,
    lower: torch.Tensor,
    attention_mask: torch.Tensor,
    n_frozen: int,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The body's last hidden state (final norm applied) from `lower_hidden`'s output: the top
    layers only, with gradients where their weights train."""
    layers, _ = decoder_stack(body)
    with _only(body, n_frozen, len(layers), final_norm=True):
        out = body(
            inputs_embeds=lower,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    return out.last_hidden_state


def pad_hidden(rows: list[torch.Tensor]) -> torch.Tensor:
    """Right-pad `[T_i, H]` rows to `[B, max T, H]` with zeros (masked positions)."""

    t = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros((len(rows), t, rows[0].shape[1]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


__all__ = [
    "decoder_stack",
    "freeze_lower",
    "lower_hidden",
    "pad_hidden",
    "same_trunk",
    "upper_hidden",
]
