"""What the tests share, one concern a module (fixtures stay in the conftest.py files):

- `records`: feedback records as the service logs them, and a store seeded with rankings.
- `redis_state`: snapshots of a Redis database, for "nothing was written" checks.
- `models`: tiny Llama checkpoints built from the default model's tokenizer.
- `data`: prompts and JSONL data files of the training tests.
- `reference`: transformers as the independent reference (greedy tokens, log-probabilities).
- `engines`: the same read from a vLLM rollout engine.
- `checkpoints`: copies of a checkpoint with every tensor changed, or hand-edited.
- `server`: a real server in this process (real engine, Redis and gRPC on free ports).
- `rpc`: gRPC stubs and request builders.
- `loop`, `worker`, `metrics`: the training loop's tests (tiny cycles, `instructloop worker`
  processes, Prometheus samples).
"""
