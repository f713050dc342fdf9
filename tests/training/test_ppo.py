"""PPO-ptx: rewards and batch layout against hand numbers and transformers, the ptx term's
accumulation, the guards, and runs on the tiny model with rollouts on a real vLLM engine."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from instructloop.training.config import ConfigError, PPOConfig
from instructloop.training.datafiles import DataError
from instructloop.training.losses import ptx_loss
from instructloop.training.ppo import (
    RolloutBatch,
    make_batch,
    ppo_update,
    ptx_stream,
    reward_model_inputs,
    run_ppo,
    shape_scores,
    token_rewards,
)
from instructloop.training.ppo.rollout import Rollout
from instructloop.training.reward_model import token_scores
from tests.support.data import GREEDY_TOKENS, WORDS, greedy_prompts, scored_sequences
from tests.support.engines import vllm_greedy, vllm_token_logprobs
from tests.support.reference import hf_greedy, hf_token_logprobs, max_abs_diff


def apple_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """The programmatic reward of these tests: the share of words that are "apple"."""
    out = []
    for r in responses:
        words = r.split()
        out.append(sum(w == "apple" for w in words) / len(words) if words else 0.0)
    return out


def word_score(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that tells the tiny SFT's answers apart: the position in WORDS of the first
    word (0 to 1), -1 for anything else. For tests that need the FIRST update to move the actor:
    under apple_fraction a batch of 16 without any "apple" (about 1 in 8 with the SFT's 1-in-8
    apples) scores all 0, and with no KL yet and the critic's zero value head every advantage
    is 0, so that update changes nothing (the KL-stop test once stopped a step late)."""
    out = []
    for r in responses:
        words = r.split()
        first = words[0] if words else ""
        out.append(WORDS.index(first) / (len(WORDS) - 1) if first in WORDS else -1.0)
    return out


# -- rewards: hand numbers ----------------------------------------------------------------------


def test_token_rewards_put_the_score_on_the_last_real_token() -> None:
    # β = 0.1, k1: KL = logp - ref = (1, 0, pad) -> rewards (-0.1, 0 + score 2, 0).
    logp = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(torch.tensor([2.0]), logp, ref, mask, 0.1, "k1")
    assert kl.tolist()[0] == pytest.approx([1.0, 0.0, 0.0])
    assert rewards.tolist()[0] == pytest.approx([-0.1, 2.0, 0.0])


def test_shape_scores_normalise_penalise_clip() -> None:
    # 4 / 2 = 2 (ended on EOS); -12 / 2 - 1 (no EOS) = -7 -> clipped to -5.
    got = shape_scores(
        [4.0, -12.0], [True, False], std=2.0, normalize=True, missing_eos_penalty=1.0, clip=5.0
    )
    assert got == pytest.approx([2.0, -5.0])
    got = shape_scores(
        [4.0, -12.0], [True, False], std=2.0, normalize=False, missing_eos_penalty=0.0, clip=None
    )
    assert got == pytest.approx([4.0, -12.0])


def test_reward_model_scores_cut_responses_at_an_appended_eos(tiny_rm: Any) -> None:
    """The RM learnt to read its score at the EOS that closes every ranked response (cut ones
    too): PPO scores a response cut at max_new_tokens with that EOS appended, so the score of a
    cut rollout is exactly the scorer's score of its text; one that ended keeps its own EOS."""
    from instructloop.training.reward_model import RewardScorer

    scorer = RewardScorer(tiny_rm.path)
    tok, eos = scorer.tokenizer, scorer.tokenizer.eos_token_id
    prompt = tok("Say apple", add_special_tokens=False)["input_ids"]
    text = "apple apple river"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cut, ended = Rollout(prompt, ids, text, False), Rollout(prompt, [*ids, eos], text, True)
    seqs = reward_model_inputs([cut, ended], eos)
    assert seqs == [[*prompt, *ids, eos], [*prompt, *ids, eos]]
    assert reward_model_inputs([cut], None) == [[*prompt, *ids]]
    got = scorer.score_ids(seqs)
    assert got[0] == pytest.approx(scorer.score(["Say apple"], [text])[0], abs=1e-5)
    # Read at the last response token instead, the same text scores differently.
    assert scorer.score_ids([[*prompt, *ids]])[0] != pytest.approx(got[0], abs=1e-4)


# -- experience layout against a plain transformers forward ------------------------------------


def fixed_rollouts(tokenizer: Any, data_dir: Path, n: int = 4, seed: int = 0) -> list[Rollout]:
    """Prompts of different lengths with responses of different lengths, some ending on EOS."""
    rng = random.Random(seed)
    prompts = greedy_prompts(data_dir, tokenizer, n)
    prompts[1] = prompts[1][3:]  # a shorter prompt: rows no longer line up
    out = []
    for i, p in enumerate(prompts):
        words = " ".join(rng.choice(WORDS) for _ in range(1 + i))
        ids = tokenizer(words, add_special_tokens=False)["input_ids"]
        eos = i % 2 == 0
        if eos:
            ids = [*ids, tokenizer.eos_token_id]
        out.append(Rollout(p, ids, words, eos))
    return out


def load_policy_models(sft_path: Path) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    actor = AutoModelForCausalLM.from_pretrained(sft_path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(sft_path, dtype=torch.float32)
    critic = AutoModelForSequenceClassification.from_pretrained(
        sft_path, num_labels=1, dtype=torch.float32
    )
    torch.manual_seed(0)
    with torch.no_grad():
        critic.score.weight.normal_(0, 0.1)  # non-zero values, so the alignment is visible
    return actor, ref, critic


def small_cfg(**kw: Any) -> PPOConfig:
    base: dict[str, Any] = dict(
        batch_size=4, minibatch_size=4, total_episodes=4, gamma_ptx=0.0, lr=1e-3, progress=False
    )
    base.update(kw)
    return PPOConfig(**base)


def test_make_batch_matches_unpadded_transformers_forward(
    tiny_sft: Any, tiny_tokenizer: Any, data_dir: Path
) -> None:
    actor, ref, critic = load_policy_models(tiny_sft.path)
    with torch.no_grad():  # make the reference differ from the actor
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    rollouts = fixed_rollouts(tiny_tokenizer, data_dir)
    scores = [1.0, -1.0, 0.5, 2.0]
    cfg = small_cfg(kl_coef=0.1, temperature=0.7, whiten_advantages=False)
    b = make_batch(
        rollouts, scores, actor=actor, reference=ref, critic=critic, cfg=cfg,
        pad_id=tiny_tokenizer.pad_token_id, device=torch.device("cpu"),
    )  # fmt: skip
    for i, r in enumerate(rollouts):
        seq = torch.tensor([r.prompt_ids + r.response_ids])
        q, n = len(r.prompt_ids), len(r.response_ids)
        with torch.no_grad():
            # Independent reference: full logits, no padding, shift by hand.
            lp = F.log_softmax(actor(seq).logits[0].float() / 0.7, -1)
            lp_ref = F.log_softmax(ref(seq).logits[0].float() / 0.7, -1)
            v = token_scores(critic, seq, torch.ones_like(seq))[0]
        want = [lp[q - 1 + j, tok].item() for j, tok in enumerate(r.response_ids)]
        want_ref = [lp_ref[q - 1 + j, tok].item() for j, tok in enumerate(r.response_ids)]
        assert b.mask[i].sum().item() == n
        assert b.logprobs[i, :n].tolist() == pytest.approx(want, abs=1e-4)
        assert b.ref_logprobs[i, :n].tolist() == pytest.approx(want_ref, abs=1e-4)
        assert b.values[i, :n].tolist() == pytest.approx(v[q - 1 : q - 1 + n].tolist(), abs=1e-4)
        assert b.logprobs[i, n:].abs().sum().item() == 0.0  # padding carries nothing
        # Rewards: -β·k1 on every token, the score added on the last one.
        kl = [a - c for a, c in zip(want, want_ref, strict=True)]
        expect = [-0.1 * k for k in kl]
        expect[-1] += scores[i]
        assert b.rewards[i, :n].tolist() == pytest.approx(expect, abs=1e-4)
    # Advantages with γ = λ = 1 would be return-to-go minus V; here λ = 0.95: check returns.
    assert torch.allclose(b.returns, (b.advantages + b.values) * b.mask, atol=1e-5)


# -- the ptx term: γ = 0 is plain PPO, γ > 0 adds γ·∇ptx into the same gradient ---------------


def ppo_setup(tiny_sft: Any, tiny_tokenizer: Any, data_dir: Path) -> tuple[Any, Any, RolloutBatch]:
    actor, ref, critic = load_policy_models(tiny_sft.path)
    rollouts = fixed_rollouts(tiny_tokenizer, data_dir)
    b = make_batch(
        rollouts, [1.0, -1.0, 0.5, 2.0], actor=actor, reference=ref, critic=critic,
        cfg=small_cfg(), pad_id=tiny_tokenizer.pad_token_id, device=torch.device("cpu"),
    )  # fmt: skip
    return actor, critic, b


def one_update(
    actor: Any, critic: Any, batch: RolloutBatch, cfg: PPOConfig, ptx: Any, sgd: bool = False
) -> dict[str, float]:
    actor, critic = copy.deepcopy(actor), copy.deepcopy(critic)
    params = [*actor.parameters(), *critic.parameters()]
    opt: torch.optim.Optimizer
    if sgd:
        opt = torch.optim.SGD(params, lr=1.0)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas)
    m = ppo_update(actor, critic, opt, batch, cfg, ptx_batches=ptx,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    return {"actor": actor, "critic": critic, "metrics": m}  # type: ignore[dict-item]


def flat(model: Any) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_gamma_ptx_zero_is_exactly_plain_ppo(
    tiny_sft: Any, tiny_tokenizer: Any, data_dir: Path
) -> None:
    actor, critic, batch = ppo_setup(tiny_sft, tiny_tokenizer, data_dir)
    ptx_path = str(data_dir / "ptx.jsonl")
    cpu = torch.device("cpu")
    plain = one_update(actor, critic, batch, small_cfg(), None)
    zero = one_update(
        actor, critic, batch, small_cfg(gamma_ptx=0.0, ptx_path=ptx_path),
        ptx_stream(ptx_path, tiny_tokenizer, 64, 2, 0, cpu),
    )  # fmt: skip
    assert torch.equal(flat(plain["actor"]), flat(zero["actor"]))
    assert torch.equal(flat(plain["critic"]), flat(zero["critic"]))
    assert not torch.equal(flat(plain["actor"]), flat(actor))  # the update did something
    with_ptx = one_update(
        actor, critic, batch, small_cfg(gamma_ptx=1.0, ptx_path=ptx_path),
        ptx_stream(ptx_path, tiny_tokenizer, 64, 2, 0, cpu),
    )  # fmt: skip
    assert not torch.equal(flat(plain["actor"]), flat(with_ptx["actor"]))
    assert with_ptx["metrics"]["ptx_loss"] > 0
    assert plain["metrics"]["ptx_loss"] == 0.0


def test_ptx_gradient_is_accumulated_into_the_ppo_gradient(
    tiny_sft: Any, tiny_tokenizer: Any, data_dir: Path
) -> None:
    """With SGD (lr 1) and no clipping, one update moves θ by -(∇L_ppo + γ ∇L_ptx): the two
    backward passes land in the same buffers before the single optimizer step (App. C.4)."""
    actor, critic, batch = ppo_setup(tiny_sft, tiny_tokenizer, data_dir)
    ptx_path = str(data_dir / "ptx.jsonl")
    cpu = torch.device("cpu")
    gamma = 2.5
    cfg0 = small_cfg(max_grad_norm=1e12)
    cfg1 = small_cfg(max_grad_norm=1e12, gamma_ptx=gamma, ptx_path=ptx_path)
    plain = one_update(actor, critic, batch, cfg0, None, sgd=True)
    mixed = one_update(
        actor, critic, batch, cfg1, ptx_stream(ptx_path, tiny_tokenizer, 64, 2, 0, cpu), sgd=True
    )
    # ∇L_ptx on the same pretraining batch, computed on its own.
    first = next(ptx_stream(ptx_path, tiny_tokenizer, 64, 2, 0, cpu))
    ids, attn = first.input_ids, first.attention_mask
    assert first.lower is None
    probe = copy.deepcopy(actor)
    ptx_loss(probe(input_ids=ids, attention_mask=attn).logits, ids, attn).backward()
    g_ptx = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
            for p in probe.parameters()
        ]
    )
    delta_plain = flat(plain["actor"]) - flat(actor)
    delta_mixed = flat(mixed["actor"]) - flat(actor)
    assert g_ptx.abs().max() > 0
    torch.testing.assert_close(delta_mixed, delta_plain - gamma * g_ptx, atol=2e-5, rtol=1e-3)
    # The critic is not in the ptx term.
    torch.testing.assert_close(flat(mixed["critic"]), flat(plain["critic"]))


def test_nan_guard_skips_the_step(tiny_sft: Any, tiny_tokenizer: Any, data_dir: Path) -> None:
    actor, critic, batch = ppo_setup(tiny_sft, tiny_tokenizer, data_dir)
    batch.advantages = batch.advantages.clone()
    batch.advantages[0, 0] = float("nan")
    out = one_update(actor, critic, batch, small_cfg(), None)
    assert out["metrics"]["skipped_minibatches"] == 1.0
    assert torch.equal(flat(out["actor"]), flat(actor))
    assert torch.equal(flat(out["critic"]), flat(critic))


# -- bad input ----------------------------------------------------------------------------------


def test_bad_configs_are_refused(tmp_path: Path, data_dir: Path, tiny_sft: Any) -> None:
    common: dict[str, Any] = dict(
        policy_path=str(tiny_sft.path), prompts_path=str(data_dir / "prompts.jsonl"),
        output_dir=str(tmp_path / "out"), progress=False,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="ptx_path"):
        run_ppo(PPOConfig(**common, gamma_ptx=1.0), apple_fraction)
    with pytest.raises(ConfigError, match="exactly one reward"):
        run_ppo(PPOConfig(**common, gamma_ptx=0.0))
    with pytest.raises(ConfigError, match="not both"):
        run_ppo(PPOConfig(**common, gamma_ptx=0.0, reward_fn="a:b", reward_model_path="x"))
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt_text": "ok"}\n{"completion": "no prompt"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2: no prompt"):
        run_ppo(PPOConfig(**{**common, "prompts_path": str(bad)}, gamma_ptx=0.0), apple_fraction)
    empty_ptx = tmp_path / "ptx.jsonl"
    empty_ptx.write_text('{"text": " "}\n')
    with pytest.raises(DataError, match="no text"):
        run_ppo(PPOConfig(**common, gamma_ptx=1.0, ptx_path=str(empty_ptx)), apple_fraction)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        run_ppo(PPOConfig(**common, gamma_ptx=0.0), apple_fraction)
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "out.metrics.jsonl").exists()


# -- with the rollout engine (vLLM) -------------------------------------------------------------


def run_cfg(tmp_path: Path, tiny_sft: Any, data_dir: Path, **kw: Any) -> PPOConfig:
    base: dict[str, Any] = dict(
        policy_path=str(tiny_sft.path), prompts_path=str(data_dir / "prompts.jsonl"),
        output_dir=str(tmp_path / "ppo"), batch_size=16, minibatch_size=8, ppo_epochs=2,
        total_episodes=32, lr=3e-3, critic_lr=3e-3, warmup_steps=0, max_new_tokens=8,
        kl_coef=0.05, gamma_ptx=0.0, progress=False, seed=0,
    )  # fmt: skip
    base.update(kw)
    return PPOConfig(**base)


def log_rows(info: Any) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (info.path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_rollout_engine_generates_with_the_current_actor(
    tmp_path: Path, tiny_sft: Any, data_dir: Path, tiny_tokenizer: Any, rollout_engine: Any
) -> None:
    """After PPO updates the engine's greedy tokens equal transformers' greedy tokens on the
    saved actor (every tensor changed, the tied embedding/head included), and differ from the
    SFT model's: the rollouts come from the current policy, not a stale one."""
    from transformers import AutoModelForCausalLM

    info = run_ppo(run_cfg(tmp_path, tiny_sft, data_dir, lr=2e-2), word_score,
                   engine=rollout_engine)  # fmt: skip
    prompts = greedy_prompts(data_dir, tiny_tokenizer)
    actor = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32)
    sft = AutoModelForCausalLM.from_pretrained(tiny_sft.path, dtype=torch.float32)
    changed = [
        n for (n, a), (_, s) in zip(actor.named_parameters(), sft.named_parameters(), strict=True)
        if not torch.equal(a, s)
    ]  # fmt: skip
    assert "model.embed_tokens.weight" in changed
    assert len(changed) == len(list(actor.parameters()))
    assert vllm_greedy(rollout_engine, prompts, GREEDY_TOKENS) == hf_greedy(
        actor, prompts, GREEDY_TOKENS
    )
    # Greedy tokens alone can miss a stale engine: the trained policy may answer as the SFT one
    # did ("apple" on every prompt). Token log-probabilities cannot: a synced engine matches the
    # actor to within float error, a stale one is off by whole nats.
    seqs = scored_sequences(data_dir, tiny_tokenizer)
    got = vllm_token_logprobs(rollout_engine, seqs)
    assert max_abs_diff(got, hf_token_logprobs(actor, seqs)) < 1e-3
    assert max_abs_diff(got, hf_token_logprobs(sft, seqs)) > 0.1


@pytest.mark.slow
def test_ppo_raises_the_reward_with_bounded_kl(
    tmp_path: Path, tiny_sft: Any, data_dir: Path, rollout_engine: Any
) -> None:
    """Programmatic reward (share of "apple" words): the SFT policy says "apple" about 1 time
    in 8; PPO on vLLM rollouts raises that while the KL to the SFT model stays bounded."""
    # lr 2e-3: at the default 3e-3 some seeds reach reward 1.0 and then collapse (seed 0 fell
    # to 0.27 on step 10); 2e-3 rose by at least 0.6 on each of six seeds.
    cfg = run_cfg(tmp_path, tiny_sft, data_dir, total_episodes=16 * 12, kl_stop=20.0, lr=2e-3)
    info = run_ppo(cfg, apple_fraction, engine=rollout_engine)
    rows = log_rows(info)
    assert len(rows) == 12 and info.manifest["early_stop"] is None
    first = sum(r["reward"] for r in rows[:2]) / 2
    last = sum(r["reward"] for r in rows[-4:]) / 4
    assert last > first + 0.3, [r["reward"] for r in rows]
    assert max(r["kl_k3"] for r in rows) < 20.0
    for key in ("reward", "kl", "entropy", "value_loss", "ptx_loss", "clip_fraction",
                "response_length", "policy_loss", "approx_kl"):  # fmt: skip
        assert all(key in r for r in rows), key
    assert info.manifest["metrics"]["final_reward"] == rows[-1]["reward"]


@pytest.mark.slow
def test_ppo_ptx_with_reward_model_and_lora(
    tmp_path: Path,
    tiny_sft: Any,
    tiny_rm: Any,
    data_dir: Path,
    tiny_tokenizer: Any,
    rollout_engine: Any,
) -> None:
    """The paper's wiring: reward from the RM checkpoint, critic from the RM, ptx term on; with
    LoRA adapters (merged for the engine and the checkpoint)."""
    from transformers import AutoModelForCausalLM

    cfg = run_cfg(
        tmp_path, tiny_sft, data_dir, reward_model_path=str(tiny_rm.path), gamma_ptx=0.5,
        ptx_path=str(data_dir / "ptx.jsonl"), use_lora=True, lora_r=4, lr=5e-3, kl_stop=None,
        parent_version="v7",
    )  # fmt: skip
    info = run_ppo(cfg, engine=rollout_engine)
    rows = log_rows(info)
    assert len(rows) == 2
    assert all(r["ptx_loss"] > 0 for r in rows)
    assert info.manifest["reward"]["reward_model_path"] == str(tiny_rm.path)
    assert info.manifest["parent_version"] == "v7"
    assert info.manifest["data_snapshot"] == "snap-test-1"
    # Merged LoRA weights: a plain model, and the engine holds exactly them.
    actor = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32)
    assert not any("lora" in n for n, _ in actor.named_parameters())
    prompts = greedy_prompts(data_dir, tiny_tokenizer)
    assert vllm_greedy(rollout_engine, prompts, GREEDY_TOKENS) == hf_greedy(
        actor, prompts, GREEDY_TOKENS
    )


@pytest.mark.slow
def test_kl_blow_up_stops_the_run(
    tmp_path: Path, tiny_sft: Any, data_dir: Path, rollout_engine: Any
) -> None:
    # The first rollout is on-reference (KL 0); after one big update the KL passes the bar.
    cfg = run_cfg(tmp_path, tiny_sft, data_dir, lr=5e-2, kl_stop=1e-3, total_episodes=16 * 3)
    info = run_ppo(cfg, word_score, engine=rollout_engine)
    stop = info.manifest["early_stop"]
    assert stop is not None and stop["reason"] == "kl" and stop["step"] == 2, (stop, log_rows(info))
    assert stop["kl_k3"] > 1e-3
    assert info.manifest["metrics"]["steps"] == 1


@pytest.mark.slow
def test_ema_weights_are_saved_while_rollouts_use_the_live_policy(
    tmp_path: Path, tiny_sft: Any, data_dir: Path, tiny_tokenizer: Any, rollout_engine: Any
) -> None:
    """ema_decay (paper: 0.992) near 1: the saved policy stays at the SFT weights while the
    engine, which samples from the live policy, has moved on."""
    from transformers import AutoModelForCausalLM

    cfg = run_cfg(tmp_path, tiny_sft, data_dir, lr=5e-2, total_episodes=16, ema_decay=1 - 1e-6)
    info = run_ppo(cfg, word_score, engine=rollout_engine)
    saved = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32)
    sft = AutoModelForCausalLM.from_pretrained(tiny_sft.path, dtype=torch.float32)
    for (name, a), (_, b) in zip(saved.named_parameters(), sft.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    seqs = scored_sequences(data_dir, tiny_tokenizer)
    got = vllm_token_logprobs(rollout_engine, seqs)
    assert max_abs_diff(got, hf_token_logprobs(sft, seqs)) > 0.1
