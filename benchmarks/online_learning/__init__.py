"""The online learning benchmark: does the product, run as a user runs it, get better from its
users' rankings while it keeps serving?

    python -m benchmarks.online_learning [--work-dir DIR] [--out PATH] [--quick] [key=value ...]

1. `instructloop up` as shipped (a private Redis, the default model, the server, the training
   worker and the beat), on a fresh data directory and free ports.
2. Idle: small streamed requests, one at a time, for the time to first token (TTFT) of a server
   with nothing else to do.
3. Before: the served v1's greedy answers over gRPC to the held-out split of the
   verifiable-instruction prompts (training/data/constraints/), kept apart from the training
   prompts.
4. Feedback: simulated users ask for K candidates (T = 1) of training prompts and rank them by
   IFEval instructions followed (training/data/simulated_labeler.py, ties kept) with
   SubmitRanking; groups in which every candidate tied are not sent.
5. `instructloop cycle run --wait` on the real worker: snapshot -> reward model -> PPO-ptx ->
   evaluate -> gate -> promote. All along, a client streams the same small requests as in 2
   (TTFT under training and the swap) and users keep asking for completions; every RPC that
   fails is counted (a stream restarted by the swap is not a failure).
6. After: once the promoted version serves, its greedy answers to the same held-out prompts.

Reported: prompt- and instruction-level accuracy before and after with the paired gain, answer
length, the rate of formatting the prompts did not ask for, TTFT p50/p99 during the cycle against
idle, failed requests, and the time from the first ranking to the promoted version being served.
Every run, targets met or missed, is written to benchmarks/results/online_learning.json and .md
(or `--out`).

Targets on the default model, 2 cores: held-out prompt-level accuracy of the promoted version
>= v1's + 10 points; mean answer words >= 60% of v1's and < 5% of answers under 8 words;
unrequested formatting at most 5 points above v1's rate; 0 failed requests; TTFT p99 during the
cycle <= 1.5x idle; <= 60 minutes from the first ranking to the promoted version being served.

Modules: `config` (the settings), `product` (`up` and the CLI as a user runs them), `client` (the
gRPC channel), `probes` (the TTFT probe), `users` (the simulated users' traffic and rankings),
`heldout` (the held-out answers and their scores), `measures` (figures and targets), `results`,
`report` (the Markdown), `run` (the phases), `__main__` (the command line).
"""
