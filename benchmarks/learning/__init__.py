"""The learning benchmark of issue 3: does the InstructGPT recipe teach the default model to follow
verifiable instructions, and what does it cost in LM loss?

    python -m benchmarks.learning [--work-dir DIR] [--quick] [key=value ...]

1. Prompts with verifiable constraints (training/data/constraints/), train and held-out
   subjects apart (the paper splits by user id, §3.2).
2. The default model (SmolLM2-135M-Instruct) is the SFT policy. It answers the held-out prompts
   (greedy): accuracy BEFORE. It samples K answers per training prompt (T = 1), and a simulated
   labeller ranks them by constraints met (ties kept): an export directory in the service's format.
3. Reward model on the rankings (paper eq. 1, K-way); held-out pairwise accuracy on rankings of
   held-out prompts.
4. PPO-ptx (γ_ptx > 0) and plain PPO (γ_ptx = 0), same seed and settings otherwise, from the SFT
   policy, against the RM, ptx corpus = the initial policy's samples on general prompts
   (training/data/ptx.py).
5. Held-out prompt-level accuracy AFTER (greedy), and LM loss on the held-out ptx corpus for the
   SFT policy, PPO and PPO-ptx (the alignment tax).

Target (issue 3): ≥ +10 points held-out prompt-level accuracy, ≤ 2% LM-loss rise under PPO-ptx,
within 60 minutes on a 2-core CPU. Results: benchmarks/results/learning.json and .md.

Modules: `config` (the settings), `state` (what a rerun in the same work dir reuses), `run` (the
steps above), `evaluation` (step 5, and the step checkpoints), `report` (the Markdown),
`__main__` (the command line).
"""
