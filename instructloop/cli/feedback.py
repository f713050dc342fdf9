"""`instructloop feedback export`: a consistent snapshot of the feedback as training data."""

from __future__ import annotations

import argparse
from pathlib import Path

from instructloop.cli.options import err
from instructloop.feedback.keys import DEFAULT_KEY_PREFIX
from instructloop.feedback.poisoning import SourceCaps


def _export(args: argparse.Namespace) -> int:
    from instructloop.feedback.config import StoreConfig
    from instructloop.feedback.errors import FeedbackError
    from instructloop.feedback.export import export_snapshot
    from instructloop.running import resolve_redis_url

    redis_url, _ = resolve_redis_url(args.redis_url)
    try:
        caps = SourceCaps(args.max_user_share, args.max_principal_share)
        m = export_snapshot(
            redis_url,
            args.out,
            config=StoreConfig(key_prefix=args.prefix),
            since_snapshot=args.since,
            caps=caps,
        )
    except (FeedbackError, ValueError) as e:
        return err(str(e))
    c = m.counts
    print(f"snapshot {m.snapshot_id} -> {args.out}")
    print(
        f"  feedback {c['feedback']} (rankings {c['ranking']}, comparisons {c['comparison']}, "
        f"ratings {c['rating']}), feedback log ({m.feedback_since}, {m.feedback_upper}]"
    )
    if c["skipped"]:
        expired = {k: len(v) for k, v in m.skipped.items() if v}
        print(f"  skipped {c['skipped']} ({expired})")
    capped = {u: s["dropped"] for u, s in m.sources["users"].items() if s["dropped"]}
    if capped:
        print(f"  over their share (cap {m.sources['caps']}): {capped}")
    for name, f in m.files.items():
        print(f"  {name:<18} {f['rows']:>8} rows")
    if c["tied_pairs_omitted"]:
        print(f"  tied pairs omitted from preferences: {c['tied_pairs_omitted']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fb = sub.add_parser("feedback", help="work with the stored completions and feedback")
    fsub = fb.add_subparsers(dest="feedback_cmd", required=True, metavar="VERB")
    ex = fsub.add_parser(
        "export",
        help="write a consistent snapshot of the feedback as training data sets",
        description="Write rankings.jsonl (ranking groups), preferences.jsonl (TRL pairs, all "
        "K-choose-2), sft.jsonl, ptx.jsonl, prompts.jsonl and manifest.json (the exact feedback "
        "ids included) into DIR. The snapshot holds everything logged up to the moment it "
        "starts; DIR appears complete or not at all.",
    )
    ex.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="target directory (new or empty)"
    )
    ex.add_argument(
        "--redis-url",
        default=None,
        help="Redis holding the feedback (default: $REDIS_URL, else the running "
        "`instructloop up`'s, else redis://127.0.0.1:6379/0)",
    )
    ex.add_argument(
        "--since",
        default=None,
        metavar="SNAPSHOT",
        help="only feedback after this earlier snapshot (its id, its directory, or a "
        "feedback-log stream id)",
    )
    ex.add_argument(
        "--max-user-share",
        type=float,
        default=SourceCaps.max_user_share,
        metavar="F",
        help="most of the rankings + comparisons one user may supply; a flood beyond it is "
        "dropped (default: %(default)s; applies once at least 1/F users gave some)",
    )
    ex.add_argument(
        "--max-principal-share",
        type=float,
        default=SourceCaps.max_principal_share,
        metavar="F",
        help="most one API key's principal may supply (default: %(default)s, no cap)",
    )
    ex.add_argument(
        "--prefix", default=DEFAULT_KEY_PREFIX, help="Redis key prefix (default: %(default)s)"
    )
    ex.set_defaults(func=_export)
