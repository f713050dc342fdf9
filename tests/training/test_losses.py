"""Each loss against a small example worked out by hand (numbers in the comments)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from instructloop.training.losses import (
    cosine_lr_factor,
    gae,
    kl_estimate,
    kway_ranking_loss,
    lm_loss,
    masked_whiten,
    ordered_pairs,
    pairwise_accuracy,
    ppo_policy_loss,
    ptx_loss,
    token_logprobs,
    value_loss,
)

LN2 = math.log(2.0)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# -- SFT: masked cross-entropy -----------------------------------------------------------------


def two_token_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Vocabulary {0, 1}; sequence 0 1 1. Position 0 predicts p(1) = 1/2 (logits 0, 0),
    position 1 predicts p(1) = 1/4 (logits ln 3, 0); position 2 predicts nothing."""
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    ids = torch.tensor([[0, 1, 1]])
    return logits, ids


def test_sft_loss_counts_only_response_tokens() -> None:
    logits, ids = two_token_logits()
    # Only the last token is response: -log(1/4) = ln 4.
    loss = lm_loss(logits, ids, torch.tensor([[0.0, 0.0, 1.0]]))
    assert loss.item() == pytest.approx(2 * LN2, abs=1e-6)
    # Tokens 1 and 2: (ln 2 + ln 4) / 2 = 1.5 ln 2.
    loss = lm_loss(logits, ids, torch.tensor([[0.0, 1.0, 1.0]]))
    assert loss.item() == pytest.approx(1.5 * LN2, abs=1e-6)
    # The same as torch's cross-entropy with ignored labels (an independent implementation).
    labels = torch.tensor([[-100, 1, 1]])
    ref = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_token_logprobs_are_shifted() -> None:
    logits, ids = two_token_logits()
    lp = token_logprobs(logits, ids)
    assert lp.shape == (1, 2)
    assert lp[0].tolist() == pytest.approx([-LN2, -2 * LN2], abs=1e-6)


def test_ptx_loss_is_mean_nll_of_real_tokens() -> None:
    # ids 0 1 <pad>: one target (token 1) predicted with p = 3/4 -> ln(4/3); the padded
    # position is ignored however unlikely it is.
    logits = torch.tensor([[[0.0, math.log(3.0)], [9.0, -9.0], [0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 1]])
    attn = torch.tensor([[1, 1, 0]])
    assert ptx_loss(logits, ids, attn).item() == pytest.approx(math.log(4 / 3), abs=1e-6)


# -- Reward model: InstructGPT eq. 1 --------------------------------------------------------------


def test_kway_loss_hand_example() -> None:
    # r = (2, 1, 0), ranked 1 > 2 > 3: pairs with differences 1, 2, 1.
    # -(2 log σ(1) + log σ(2)) / 3 = (2 · 0.3132617 + 0.1269280) / 3 = 0.2511505
    r = torch.tensor([2.0, 1.0, 0.0])
    assert kway_ranking_loss(r, [1, 2, 3]).item() == pytest.approx(0.2511505, abs=1e-6)


def test_kway_loss_equals_mean_over_explicit_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    for k in (2, 4, 5, 9):
        r = torch.randn(k, generator=gen)
        ranks = list(range(1, k + 1))
        explicit = [
            -logsig(r[i].item() - r[j].item()) for i, j in itertools.combinations(range(k), 2)
        ]
        assert len(explicit) == math.comb(k, 2)
        got = kway_ranking_loss(r, ranks).item()
        assert got == pytest.approx(sum(explicit) / len(explicit), abs=1e-5)


def test_kway_loss_k2_is_a_comparison() -> None:
    r = torch.tensor([0.5, -0.5])
    assert kway_ranking_loss(r, [1, 2]).item() == pytest.approx(-logsig(1.0), abs=1e-6)
    # Order of listing does not matter, only ranks.
    assert kway_ranking_loss(r.flip(0), [2, 1]).item() == pytest.approx(-logsig(1.0), abs=1e-6)


def test_kway_loss_ties_are_left_out() -> None:
    # ranks 1, 2, 2: pairs (0,1) and (0,2) only, divided by 2, not by C(3,2) = 3:
    # (0.3132617 + 0.1269280) / 2 = 0.2200948
    r = torch.tensor([2.0, 1.0, 0.0], requires_grad=True)
    loss = kway_ranking_loss(r, [1, 2, 2])
    assert loss.item() == pytest.approx(0.2200948, abs=1e-6)
    assert ordered_pairs([1, 2, 2]) == [(0, 1), (0, 2)]
    # No term pulls the tied pair together or apart: d/dr1 and d/dr2 come from their pair with
    # r0 only, -σ(r_l - r_w)/N each with the loser's sign.
    loss.backward()
    assert r.grad is not None
    s1 = torch.sigmoid(torch.tensor(-1.0)).item()
    s2 = torch.sigmoid(torch.tensor(-2.0)).item()
    assert r.grad.tolist() == pytest.approx([-(s1 + s2) / 2, s1 / 2, s2 / 2], abs=1e-6)


def test_kway_loss_all_tied_is_zero_and_bad_shapes_fail() -> None:
    r = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = kway_ranking_loss(r, [1, 1])
    assert loss.item() == 0.0
    loss.backward()
    assert r.grad is not None and r.grad.abs().sum().item() == 0.0
    with pytest.raises(ValueError):
        kway_ranking_loss(torch.zeros(3), [1, 2])


def test_pairwise_accuracy() -> None:
    # r = (0, 1, 2) but ranked 1 < 2 < 3 (best first): every pair is wrong except none -> 0/3;
    # with a tie the tied pair does not count.
    assert pairwise_accuracy(torch.tensor([0.0, 1.0, 2.0]), [1, 2, 3]) == (0, 3)
    assert pairwise_accuracy(torch.tensor([2.0, 1.0, 1.5]), [1, 2, 2]) == (2, 2)


# -- PPO ----------------------------------------------------------------------------------------


def test_kl_estimators() -> None:
    # π(y) = 1/2, π_ref(y) = 1/4: log r = ln(1/2).
    # k1 = ln 2 = 0.6931472; k2 = ½ ln²2 = 0.2402265; k3 = (1/2 - 1) + ln 2 = 0.1931472
    # π(y) = 1/4, π_ref(y) = 1/2: log r = ln 2.
    # k1 = -ln 2 (negative for one token); k2 = 0.2402265; k3 = (2 - 1) - ln 2 = 0.3068528
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([LN2, -LN2], abs=1e-6)
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx([0.2402265, 0.2402265], abs=1e-6)
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([0.1931472, 0.3068528], abs=1e-6)
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")  # type: ignore[arg-type]


def test_ppo_clipped_loss_hand_example() -> None:
    # ratios 1.5, 0.5, 1.1 with advantages 1, 1, -1 and ε = 0.2:
    #   t0: max(-1.5, -1.2) = -1.2 (clip bites)    t1: max(-0.5, -0.8) = -0.5
    #   t2: max(1.1, 1.1) = 1.1                    t3: masked out
    # loss = (-1.2 - 0.5 + 1.1) / 3 = -0.2, clip fraction 1/3
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 50.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = ppo_policy_loss(new, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3, abs=1e-6)


def test_value_loss_clipped_hand_example() -> None:
    # V = (1, 0), V_old = (0.5, 0.5), returns (2, 0), clip 0.2:
    #   t0: (1-2)² = 1 vs V_clip = 0.7: (0.7-2)² = 1.69 -> 1.69
    #   t1: (0-0)² = 0 vs V_clip = 0.3: 0.09 -> 0.09
    # loss = ½ (1.69 + 0.09) / 2 = 0.445, both clipped; unclipped: ½ (1 + 0) / 2 = 0.25
    v = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.5]])
    ret = torch.tensor([[2.0, 0.0]])
    mask = torch.ones(1, 2)
    loss, frac = value_loss(v, old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(0.445, abs=1e-6)
    assert frac.item() == pytest.approx(1.0)
    loss, _ = value_loss(v, old, ret, mask, None)
    assert loss.item() == pytest.approx(0.25, abs=1e-6)


def test_gae_gamma_one_hand_example() -> None:
    # Row 0, λ = 0.5, r = (0, 0, 1), V = (0.5, 0.25, 0.5), end after t2:
    #   δ2 = 1 - 0.5 = 0.5               A2 = 0.5
    #   δ1 = 0 + 0.5 - 0.25 = 0.25       A1 = 0.25 + 0.5 · 0.5 = 0.5
    #   δ0 = 0 + 0.25 - 0.5 = -0.25      A0 = -0.25 + 0.5 · 0.5 = 0
    #   returns = A + V = (0.5, 0.75, 1.0)
    # Row 1: one real token, r = 1, V = 0.2: A = 0.8, return 1; padding (V = 9) ignored.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.5], [0.2, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv.tolist() == [pytest.approx([0.0, 0.5, 0.5]), pytest.approx([0.8, 0.0, 0.0])]
    assert ret.tolist() == [pytest.approx([0.5, 0.75, 1.0]), pytest.approx([1.0, 0.0, 0.0])]
    # λ = 1, γ = 1: A_t = (sum of rewards from t) - V_t = (0.5, 0.75, 0.5); returns all 1.
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.75, 0.5])
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_masked_whiten() -> None:
    # (1, 2, 3) -> mean 2, unbiased var 1 -> (-1, 0, 1); the masked 100 becomes 0.
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_whiten(x, mask).tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)


def test_cosine_schedule_ends_at_ten_percent() -> None:
    assert cosine_lr_factor(0, 100) == pytest.approx(1.0)
    assert cosine_lr_factor(50, 100) == pytest.approx(0.55)
    assert cosine_lr_factor(100, 100) == pytest.approx(0.1)
    assert cosine_lr_factor(0, 100, warmup=10) == pytest.approx(0.1)
