"""The short Markdown report of one run (also of a run that stopped on an error)."""

from __future__ import annotations

from typing import Any


def _fmt(x: float | None, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def markdown(r: dict[str, Any]) -> str:
    """A short report of one run (also of a run that stopped on an error)."""
    lines = [*_header(r), *_accuracy_table(r), ""]
    lines += _learning_lines(r) + _serving_lines(r) + _up_lines(r)
    tg = r.get("targets", {})
    if tg:
        lines.append(
            "- Targets met: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in tg.items())
        )
    return "\n".join(lines) + "\n"


def _header(r: dict[str, Any]) -> list[str]:
    m = r.get("machine", {})
    lines = [
        "### Online learning benchmark (`instructloop up` as shipped)",
        "",
        f"{r.get('date', '?')}, {m.get('cpu', '?')} ({m.get('cores', '?')} cores, "
        f"{m.get('memory_gib', '?')} GiB; load average {_fmt(m.get('loadavg_1m'), '.1f')} at "
        f"the start){'; QUICK run: harness check only' if r.get('quick') else ''}.",
    ]
    if r.get("error"):
        lines += ["", f"**The run stopped on an error:** {r['error']}"]
    if r.get("scoring_error"):
        lines += ["", f"**Scoring the held-out answers failed:** {r['scoring_error']}"]
    return lines


def _accuracy_table(r: dict[str, Any]) -> list[str]:
    acc = r.get("heldout_accuracy", {})
    words = r.get("answer_words", {})
    fmt = r.get("unrequested_formatting", {})
    versions = r.get("versions", {})
    lines: list[str] = []
    if acc:
        lines += [
            "",
            "| version | held-out prompt-level | instruction-level | answer words (mean; < 8) "
            "| unrequested formatting |",
            "|---|---|---|---|---|",
        ]
    for key, label in (("before", "v1 (before)"), ("after", "after the cycle")):
        a, w, f = acc.get(key), words.get(key), fmt.get(key)
        if a is None:
            continue
        wtxt = f"{w['mean']:.1f}; {w['share_under_8']:.0%}" if w else "-"
        ftxt = f"{f['rate']:.1%}" if f and f.get("rate") is not None else "-"
        lines.append(
            f"| {label}: {versions.get(key, '?')} | {a['prompt_level']:.3f} | "
            f"{a['instruction_level']:.3f} | {wtxt} | {ftxt} |"
        )
    return lines


def _learning_lines(r: dict[str, Any]) -> list[str]:
    """The gain, the feedback sent and each cycle."""
    fb = r.get("feedback", {})
    gain = r.get("paired_gain")
    lines = []
    if gain:
        lines.append(
            f"- Prompt-level gain: {gain['points']:+.1f} ± {gain['standard_error_points']:.1f} "
            f"points (paired, {gain['gained']} prompts gained, {gain['lost']} lost, of "
            f"{gain['n_prompts']}; target ≥ +10)."
        )
    if fb:
        lines.append(
            f"- Feedback: {fb.get('rankings', 0)} K={r.get('config', {}).get('k')} rankings "
            f"from {fb.get('prompts', 0)} training prompts ({fb.get('all_tied', 0)} all-tied "
            f"groups not sent), {_fmt(fb.get('seconds'), '.0f')} s."
        )
    for c in r.get("cycles", []):
        steps = ", ".join(
            f"{k} {v:.0f}" for k, v in c.get("steps_s", {}).items() if isinstance(v, int | float)
        )
        gate = c.get("gate", {})
        checks = ", ".join(
            f"{k} {'ok' if ok else 'FAILED'}" for k, ok in gate.get("checks", {}).items()
        )
        lines.append(
            f"- Cycle {c.get('id', '?')}: {c.get('state', '?')} (exit {c.get('exit_code')})"
            f"{': ' + c['reason'] if c.get('reason') else ''}; "
            f"{_fmt(c.get('wall_s'), '.0f')} s{f' ({steps} s)' if steps else ''}"
            f"{'; gate: ' + checks if checks else ''}."
        )
    return lines


def _serving_lines(r: dict[str, Any]) -> list[str]:
    """TTFT, failed requests and the time to the promoted version served."""
    ttft = r.get("ttft", {})
    idle, cyc = ttft.get("idle", {}), ttft.get("cycle", {})
    traffic = ttft.get("traffic", {})
    failed = r.get("failed_requests", {})
    return [
        f"- TTFT ({r.get('config', {}).get('probe_max_tokens')}-token streams): idle p50 "
        f"{_fmt(idle.get('p50_s'), '.3f')} s, p99 {_fmt(idle.get('p99_s'), '.3f')} s "
        f"(n = {idle.get('n', 0)}); during the cycle p50 {_fmt(cyc.get('p50_s'), '.3f')} s, "
        f"p99 {_fmt(cyc.get('p99_s'), '.3f')} s (n = {cyc.get('n', 0)}, "
        f"{ttft.get('restarts', 0)} streams restarted by the swap): p99 ratio "
        f"{_fmt(ttft.get('p99_ratio'), '.2f')}x (target ≤ 1.5x). Beside the same users' "
        f"traffic without a cycle: p50 {_fmt(traffic.get('p50_s'), '.3f')} s, p99 "
        f"{_fmt(traffic.get('p99_s'), '.3f')} s (n = {traffic.get('n', 0)}); the cycle's p99 "
        f"is {_fmt(ttft.get('p99_ratio_vs_traffic'), '.2f')}x that.",
        f"- Failed requests: {failed.get('total', 0)}"
        + (
            " (" + ", ".join(f"{k} {v}" for k, v in failed.get("by_phase", {}).items()) + ")"
            if failed.get("total")
            else ""
        )
        + ".",
        f"- First ranking to the promoted version served: "
        f"{_fmt(r.get('first_ranking_to_served_s'), '.0f')} s (target ≤ 3600); promotion to "
        f"served {_fmt(r.get('promotion_to_served_s'), '.2f')} s.",
    ]


def _up_lines(r: dict[str, Any]) -> list[str]:
    """How `up` stopped, and the OOM kills of the run."""
    up = r.get("up_exit", {})
    if not up:
        return []
    oom = r.get("oom", {})
    return [
        f"- `up` stopped by SIGINT: exit {up.get('exit_code')} after "
        f"{_fmt(up.get('seconds'), '.1f')} s"
        f"{' (did not stop in time: killed)' if up.get('forced') else ''}"
        f"{'; processes of its group were left and killed' if up.get('leftovers') else ''}"
        f"; OOM kills in the kernel log: "
        + (str(len(oom["lines"])) if oom.get("lines") is not None else "not readable")
        + "."
    ]
