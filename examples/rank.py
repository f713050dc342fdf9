"""Feed the loop: ask the running server for K answers to a prompt, rank them, submit the ranking.

    .venv/bin/python examples/rank.py                   # you rank, in the terminal
    .venv/bin/python examples/rank.py --simulated 256   # simulated users rank 256 prompts

By hand, each prompt's K answers are printed and you type their order, best first ("2 0 3 1";
equal answers may share a place with "=": "2=0 3 1"). With --simulated N, simulated users rank
the answers to N instruction prompts as the learning benchmark's do (instructions followed, less
formatting nobody asked for, degenerate answers last: training/data/simulated_users.py).

It reaches the server that `instructloop up` runs (its record in the data directory), or
--address; the key comes from INSTRUCTLOOP_API_KEYS (the first one) or --key.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc

from instructloop.running import read_running
from instructloop.v1 import completion_pb2 as c
from instructloop.v1 import completion_pb2_grpc as cg
from instructloop.v1 import feedback_pb2 as f
from instructloop.v1 import feedback_pb2_grpc as fg

HAND_PROMPTS = (
    "Write a haiku about autumn.",
    "Explain what a reward model is in two sentences.",
    "Give three tips for a good night's sleep.",
)


def parse_order(text: str, k: int) -> tuple[list[int], list[int]]:
    """ "2=0 3 1" -> (indices best first, dense ranks); ValueError for anything else."""
    order, ranks = [], []
    for place, group in enumerate(text.split(), 1):
        for tok in group.split("="):
            order.append(int(tok))
            ranks.append(place)
    if sorted(order) != list(range(k)):
        raise ValueError(f"give each of 0..{k - 1} once")
    return order, ranks


def ask(
    stub: cg.CompletionServiceStub, md: list, prompt: str, k: int, user: str
) -> c.CompletionResponse:
    return stub.Complete(
        c.CompletionRequest(
            messages=[c.ChatMessage(role="user", content=prompt)],
            n=k, max_tokens=96, temperature=1.0, user_id=user,
        ),
        metadata=md,
    )  # fmt: skip


def submit(fb: fg.FeedbackServiceStub, md: list, resp: c.CompletionResponse, user: str,
           order: list[int], ranks: list[int]) -> str:  # fmt: skip
    ack = fb.SubmitRanking(
        f.SubmitRankingRequest(
            user_id=user, idempotency_key=f"rank-{resp.completion_id}",
            completion_id=resp.completion_id,
            ranked_response_ids=[resp.choices[i].response_id for i in order], ranks=ranks,
        ),
        metadata=md,
    )  # fmt: skip
    return str(ack.feedback_id)


def by_hand(stub: cg.CompletionServiceStub, fb: fg.FeedbackServiceStub, md: list, k: int) -> None:
    for prompt in HAND_PROMPTS:
        resp = ask(stub, md, prompt, k, "you")
        print(f"\n{prompt}  ({resp.model_version})")
        for i, ch in enumerate(resp.choices):
            print(f"  [{i}] {ch.text.strip()}")
        while True:
            try:
                order, ranks = parse_order(input("order, best first (e.g. 2 0 3 1): "), k)
                break
            except ValueError as e:
                print(f"  {e}")
        print("  stored", submit(fb, md, resp, "you", order, ranks))


def simulated(stub: cg.CompletionServiceStub, fb: fg.FeedbackServiceStub, md: list, k: int,
              n: int, users: int) -> None:  # fmt: skip
    from instructloop.training.data.constraints import generate_prompts
    from instructloop.training.data.simulated_labeler import rank, ranking_order

    def one(i_p: tuple[int, object]) -> bool:
        i, p = i_p
        user = f"sim-{i % users}"
        resp = ask(stub, md, p.prompt, k, user)  # type: ignore[attr-defined]
        texts = [ch.text for ch in resp.choices]
        r = rank(p, texts)  # type: ignore[arg-type]
        order, ranks = ranking_order(texts, r.responses, r.ranks)
        if len(set(r.ranks)) == 1:
            return False  # every answer tied: nothing to learn, a person would skip it
        submit(fb, md, resp, user, order, ranks)
        return True

    prompts = list(enumerate(generate_prompts(n, "train", seed=0)))
    with ThreadPoolExecutor(8) as pool:
        done = 0
        for i, sent in enumerate(pool.map(one, prompts), 1):
            done += sent
            if i % 16 == 0 or i == n:
                print(f"{i}/{n} prompts, {done} rankings stored", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default=None, help="host:port (default: the running `up`)")
    ap.add_argument("--key", default=None, help="API key (default: INSTRUCTLOOP_API_KEYS)")
    ap.add_argument("-k", type=int, default=4, help="answers per prompt (InstructGPT: 4 to 9)")
    ap.add_argument("--simulated", type=int, default=0, metavar="N", help="N prompts, ranked "
                    "by simulated users")  # fmt: skip
    ap.add_argument(
        "--users", type=int, default=16, help="simulated users (rate limits are per user)"
    )
    args = ap.parse_args()
    loop = read_running()
    address = args.address or (loop.grpc if loop else "127.0.0.1:50051")
    first = os.environ.get("INSTRUCTLOOP_API_KEYS", "").split(",")[0].strip()
    key = args.key or first.rpartition(":")[2]  # a `NAME:KEY` entry names its principal
    md = [("authorization", f"Bearer {key}")] if key else []
    with grpc.insecure_channel(address) as ch:
        stub, fb = cg.CompletionServiceStub(ch), fg.FeedbackServiceStub(ch)
        try:
            if args.simulated:
                simulated(stub, fb, md, args.k, args.simulated, args.users)
            else:
                by_hand(stub, fb, md, args.k)
        except grpc.RpcError as e:
            print(f"error: {address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
