"""The short Markdown report of one learning run."""

from __future__ import annotations

from typing import Any


def markdown(r: dict[str, Any]) -> str:
    lines = [*_table(r), "", *_summary(r), *_curves(r)]
    lines.append(
        "- Targets met: "
        + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["targets"].items())
    )
    return "\n".join(lines) + "\n"


def _table(r: dict[str, Any]) -> list[str]:
    """The heading and one row per policy."""
    acc = r["heldout_accuracy"]
    loss = r["ptx_lm_loss"]
    rows = [("SFT (default model)", "before")] + [
        (k.replace("_", "-").upper(), k) for k in acc if k != "before"
    ]
    lines = [
        "### Learning benchmark (issue 3)",
        "",
        f"{r['date']}, {r['machine']['platform']}, {r['machine']['cpu_count']} CPUs"
        f"{', ' + r['machine']['cuda'] if r['machine']['cuda'] else ''}; "
        f"load average at the end {r['machine']['load_average_at_end'][0]:.1f}.",
        "",
        "| policy | held-out prompt-level acc. | instruction-level acc. | ptx LM loss (nats/tok)"
        " | answer words (mean; share < 8) |",
        "|---|---|---|---|---|",
    ]
    words = r.get("answer_words", {})
    for label, key in rows:
        lk = "sft" if key == "before" else key
        w = words.get(key)
        wtxt = f"{w['mean']:.1f}; {w['share_under_8']:.0%}" if w else "-"
        lines.append(
            f"| {label} | {acc[key]['prompt_level']:.3f} | "
            f"{acc[key]['instruction_level']:.3f} | {loss[lk]['nll']:.4f} | {wtxt} |"
        )
    return lines


def _summary(r: dict[str, Any]) -> list[str]:
    """The gain, the reward model, the alignment tax and the time."""
    acc = r["heldout_accuracy"]
    rm = r["reward_model"]
    secs = r["seconds"]
    paired = ", ".join(
        f"{k} {g['points']:+.1f} ± {g['standard_error_points']:.1f} ({g['gained']}/{g['lost']})"
        for k, g in r.get("paired_gain", {}).items()
    )  # absent from older result files
    return [
        f"- Prompt-level gain under PPO-ptx: {r['prompt_level_gain_points']:+.1f} points "
        f"(target ≥ +10) on {acc['before']['n_prompts']} held-out prompts"
        + (f"; paired standard error, prompts gained/lost vs SFT: {paired}." if paired else "."),
        f"- Reward model held-out pairwise accuracy: {rm.get('val_accuracy', float('nan')):.3f} "
        f"on {rm.get('val_pairs', '?')} pairs (paper: about 0.70).",
        "- ptx LM loss rise vs SFT: "
        + ", ".join(f"{k} {v:+.2%}" for k, v in r["ptx_lm_loss_rise"].items())
        + " (target for PPO-ptx ≤ +2%).",
        f"- Time: {secs.get('recipe_total', secs['total']) / 60:.1f} min for the recipe (sampling,"
        f" RM, PPO-ptx, its evaluation; target ≤ 60), {secs['total'] / 60:.1f} min with the plain"
        " PPO comparison: "
        + ", ".join(f"{k[:-2]} {v / 60:.1f}" for k, v in secs.items() if k.endswith("_s"))
        + " min.",
    ]


def _curves(r: dict[str, Any]) -> list[str]:
    """Along each run, the scored step checkpoints."""
    return [
        f"- Along the {k} run (held-out gain vs SFT; mean answer words; ptx LM-loss rise): "
        + ", ".join(
            f"step {c['step']} {c['paired_gain']['points']:+.1f} ± "
            f"{c['paired_gain']['standard_error_points']:.1f} "
            f"({c['answer_words']['mean']:.0f} words"
            + (f"; {c['ptx_lm_loss_rise']:+.1%}" if "ptx_lm_loss_rise" in c else "")
            + ")"
            for c in cs
        )
        + "."
        for k, cs in r.get("checkpoint_curve", {}).items()
    ]
