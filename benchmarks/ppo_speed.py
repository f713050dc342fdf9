"""PPO speed: instructloop's PPO (vLLM rollouts) against TRL's `trl.experimental.ppo.PPOTrainer`
(trl 1.12.0, HF generate rollouts), side by side in one run, each in its own subprocess.

    python -m benchmarks.ppo_speed [--batch 16] [--minibatch 4] [--response-length 64]
                                   [--steps 3] [--warmup 1] [--model DIR]

Same for both: the policy (default: SmolLM2-135M-Instruct, trained in float32, or under bf16
autocast with `--precision bf16`, both sides alike), the reference (a frozen copy), the reward
and value models (one sequence-classification model made from the policy with a seeded random
head: speed does not depend on what the head learned), the prompts (chat template applied),
rollout batch, minibatch, 1 PPO epoch, response length limit with EOS stopping, temperature 1,
plain PPO (TRL has no ptx term). Each side first runs `warmup` steps that are not timed (engine
start, first allocations); samples/s = timed steps × batch / their wall time. Tokens/s (response
tokens sampled per second) is given too, since the two sides sample their own responses and EOS
ends them at different lengths.

Results: benchmarks/results/ppo_speed.json and ppo_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, torch_machine

# ---------------------------------------------------------------------------------------------
# Shared inputs
# ---------------------------------------------------------------------------------------------


def prepare(work: Path, model: str, n_prompts: int, seed: int) -> dict[str, str]:
    """prompts.jsonl ({"prompt", "prompt_text"}) and a reward/value model directory."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from instructloop.training.data.constraints import generate_prompts
    from instructloop.training.data.generation import chat_prompt_text

    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = generate_prompts(n_prompts, "train", seed=seed)
    rows = [{"prompt": p.prompt, "prompt_text": chat_prompt_text(tok, p.prompt)} for p in prompts]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rm_dir = work / "rm"
    if not (rm_dir / "config.json").exists():
        torch.manual_seed(seed)
        rm = AutoModelForSequenceClassification.from_pretrained(
            model, num_labels=1, dtype=torch.float32
        )
        # Pad != EOS so that the score is read at the EOS closing the response (as ours does).
        rm.config.pad_token_id = tok.pad_token_id if tok.pad_token_id != tok.eos_token_id else 0
        rm.save_pretrained(rm_dir)
        tok.save_pretrained(rm_dir)
    return {"prompts": str(work / "prompts.jsonl"), "rm": str(rm_dir)}


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------


def child_ours(a: argparse.Namespace) -> dict[str, Any]:
    from instructloop.training.config import PPOConfig
    from instructloop.training.ppo import run_ppo

    work = Path(a.work)
    out = work / "ours-out"
    cfg = PPOConfig(
        policy_path=a.model,
        reward_model_path=a.rm,
        prompts_path=a.prompts,
        output_dir=str(out),
        overwrite=True,
        total_episodes=a.batch * (a.warmup + a.steps),
        batch_size=a.batch,
        minibatch_size=a.minibatch,
        ppo_epochs=1,
        max_new_tokens=a.response_length,
        temperature=1.0,
        kl_coef=0.05,
        gamma_ptx=0.0,
        warmup_steps=0,
        kl_stop=None,
        mixed_precision="bf16" if a.precision == "bf16" else "no",
        seed=a.seed,
        progress=False,
        log_path=str(work / "ours-metrics.jsonl"),
    )
    t0 = time.time()
    run_ppo(cfg)
    total = time.time() - t0
    rows = [json.loads(x) for x in (work / "ours-metrics.jsonl").read_text().splitlines()]
    if len(rows) < a.warmup + a.steps:
        raise RuntimeError(f"ours ran {len(rows)} steps, expected {a.warmup + a.steps}")
    # MetricsLog's "time" is seconds since training began, taken as each step is logged.
    t_start = rows[a.warmup - 1]["time"] if a.warmup else 0.0
    timed = rows[a.warmup : a.warmup + a.steps]
    dt = timed[-1]["time"] - t_start
    tokens = sum(r["response_length"] * a.batch for r in timed)
    return {
        "impl": "instructloop (vLLM rollouts)",
        "timed_seconds": dt,
        "samples_per_s": a.steps * a.batch / dt,
        "response_tokens_per_s": tokens / dt,
        "mean_response_length": tokens / (a.steps * a.batch),
        "seconds_per_step": dt / a.steps,
        "phase_seconds_per_step": {
            k: sum(r.get(k, 0.0) for r in timed) / a.steps
            for k in ("rollout_seconds", "update_seconds", "sync_seconds")
        },
        "total_seconds_incl_setup": total,
    }


def child_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    torch.manual_seed(a.seed)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    rows = [json.loads(x) for x in Path(a.prompts).read_text().splitlines()]
    ids = [tok(r["prompt_text"], add_special_tokens=False)["input_ids"] for r in rows]
    ds = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(
        a.rm, num_labels=1, dtype=torch.float32
    )
    reward = AutoModelForSequenceClassification.from_pretrained(
        a.rm, num_labels=1, dtype=torch.float32
    )
    args = PPOConfig(
        output_dir=str(Path(a.work) / "trl-out"),
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=a.batch // a.minibatch,
        num_ppo_epochs=1,
        total_episodes=a.batch * (a.warmup + a.steps),
        response_length=a.response_length,
        local_rollout_forward_batch_size=a.batch,
        stop_token="eos",
        temperature=1.0,
        kl_coef=0.05,
        missing_eos_penalty=1.0,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=not torch.cuda.is_available(),
        bf16=a.precision == "bf16",
        seed=a.seed,
        disable_tqdm=True,
    )

    # Measurement only: how many response tokens each rollout produced (up to the first EOS),
    # and the width HF generate actually ran to.
    lengths: list[list[int]] = []
    widths: list[int] = []
    real_generate = trl_ppo.batch_generation

    def counting_generate(model: Any, queries: Any, *args: Any, **kw: Any) -> Any:
        qr, logits = real_generate(model, queries, *args, **kw)
        resp = qr[:, queries.shape[1] :]
        is_eos = resp == tok.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, resp.shape[1])
        lengths.append(first.tolist())
        widths.append(int(resp.shape[1]))
        return qr, logits

    trl_ppo.batch_generation = counting_generate
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *args: Any, **kw: Any) -> None:
            stamps.append(time.time())

    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=ds,
        value_model=value,
        callbacks=[Stamp()],
    )
    t_train = time.time()
    trainer.train()
    total = time.time() - t0
    if len(stamps) < a.warmup + a.steps:
        raise RuntimeError(f"TRL ran {len(stamps)} steps, expected {a.warmup + a.steps}")
    t_start = stamps[a.warmup - 1] if a.warmup else t_train
    dt = stamps[a.warmup + a.steps - 1] - t_start
    timed_lengths = [n for batch in lengths[a.warmup : a.warmup + a.steps] for n in batch]
    return {
        "impl": "TRL PPOTrainer (HF generate rollouts)",
        "trl_version": __import__("trl").__version__,
        "timed_seconds": dt,
        "samples_per_s": a.steps * a.batch / dt,
        "response_tokens_per_s": sum(timed_lengths) / dt,
        "mean_response_length": sum(timed_lengths) / max(1, len(timed_lengths)),
        # HF generate runs a batch until its longest response ends: the width it computed.
        "mean_generated_width": sum(widths[a.warmup :]) / max(1, len(widths[a.warmup :])),
        "seconds_per_step": dt / a.steps,
        "total_seconds_incl_setup": total,
    }


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    import torch

    return torch_machine(torch_threads=torch.get_num_threads(), load_average=os.getloadavg())


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        "### PPO speed: instructloop vs TRL (issue 3)",
        "",
        f"{r['date']}, {r['machine']['platform']}, {r['machine']['cpu_count']} CPUs"
        f"{', ' + r['machine']['cuda'] if r['machine']['cuda'] else ''}; model "
        f"{Path(s['model']).name}, {s.get('precision', 'fp32')} on both sides, batch "
        f"{s['batch']}, minibatch {s['minibatch']}, 1 PPO epoch, "
        f"≤ {s['response_length']} response tokens (EOS stops), {s['steps']} timed steps after "
        f"{s['warmup']} warm-up; load average before/after "
        f"{r['machine']['load_average'][0]:.1f}/{r['load_average_after'][0]:.1f}.",
        "",
        "| implementation | samples/s | response tokens/s | mean response length | s/step |",
        "|---|---|---|---|---|",
    ]
    for name in ("ours", "trl"):
        x = r["results"].get(name)
        if x is None or "error" in x:
            err = "not run" if x is None else x["error"]
            lines.append(f"| {name} | failed: {err} | | | |")
            continue
        lines.append(
            f"| {x['impl']} | {x['samples_per_s']:.3f} | "
            f"{x['response_tokens_per_s']:.1f} | {x['mean_response_length']:.1f} | "
            f"{x['seconds_per_step']:.1f} |"
        )
    if "speedup_samples" in r:
        lines += [
            "",
            f"Speed-up (samples/s): {r['speedup_samples']:.2f}× (target ≥ 2×); "
            f"response tokens/s: {r['speedup_tokens']:.2f}×.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="policy directory (default: the default model)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--minibatch", type=int, default=4)
    ap.add_argument("--response-length", type=int, default=64)
    ap.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="both sides alike: float32, or bf16 autocast over float32 weights (TRL bf16=True)",
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--impls", default="ours,trl", help="comma-separated: ours, trl")
    ap.add_argument("--work", default="", help="work directory (default: a temporary one)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "ppo_speed.json"))
    ap.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--rm", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.batch % a.minibatch:
        ap.error("--batch must be a multiple of --minibatch")
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps >= 1 and --warmup >= 0")

    if a.child:
        res = child_ours(a) if a.child == "ours" else child_trl(a)
        Path(a.result).write_text(json.dumps(res, indent=1))
        return 0

    import tempfile

    from instructloop.training.models import resolve_model_path

    a.model = resolve_model_path(a.model)
    work = Path(a.work or tempfile.mkdtemp(prefix="instructloop-ppo-speed-"))
    inputs = prepare(work, a.model, n_prompts=max(64, a.batch * (a.warmup + a.steps)), seed=a.seed)
    machine = _machine()
    results: dict[str, Any] = {}
    for impl in [x.strip() for x in a.impls.split(",") if x.strip()]:
        res_path = work / f"{impl}.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.ppo_speed",
            "--child",
            impl,
            "--work",
            str(work),
            "--model",
            a.model,
            "--prompts",
            inputs["prompts"],
            "--rm",
            inputs["rm"],
            "--batch",
            str(a.batch),
            "--minibatch",
            str(a.minibatch),
            "--response-length",
            str(a.response_length),
            "--precision",
            a.precision,
            "--steps",
            str(a.steps),
            "--warmup",
            str(a.warmup),
            "--seed",
            str(a.seed),
            "--result",
            str(res_path),
        ]
        print(f"[ppo_speed] {impl}: {' '.join(cmd[3:5])} ...", file=sys.stderr, flush=True)
        t = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (work / f"{impl}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            results[impl] = {"error": f"exit {proc.returncode}", "log": str(work / f"{impl}.log")}
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        results[impl] = json.loads(res_path.read_text())
        results[impl]["subprocess_seconds"] = time.time() - t
        print(
            f"[ppo_speed] {impl}: {results[impl]['samples_per_s']:.3f} samples/s",
            file=sys.stderr,
            flush=True,
        )
    report: dict[str, Any] = {
        "benchmark": "ppo_speed",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine,
        "load_average_after": os.getloadavg(),
        "settings": {
            k: getattr(a, k)
            for k in (
                "model",
                "batch",
                "minibatch",
                "response_length",
                "steps",
                "warmup",
                "seed",
                "precision",
            )
        },
        "results": results,
        "work_dir": str(work),
    }
    ours, trl = results.get("ours", {}), results.get("trl", {})
    if "samples_per_s" in ours and "samples_per_s" in trl:
        report["speedup_samples"] = ours["samples_per_s"] / trl["samples_per_s"]
        report["speedup_tokens"] = ours["response_tokens_per_s"] / trl["response_tokens_per_s"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all("error" not in v for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
