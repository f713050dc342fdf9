"""The training loop: feedback in, a better model served.

One cycle is snapshot -> reward model -> PPO-ptx -> evaluate -> gate -> promote, each step a
Celery task. The modules, read from the bottom up:

- `config`: CycleConfig (what one cycle does) and LoopConfig (workers, beat, locks);
- `locks`: the cycle lock with its fencing token, the beat lock, a step's lease;
- `store`: cycle records, flags and pointers in Redis, and the errors a cycle ends with;
- `stages`: the one way to the other components (feedback export, registry, the stages);
- `supervise`: a heavy step in its own subprocess, and that subprocess;
- `heartbeat`, `steps`, `runner`: the steps, and running one idempotently, fenced, cancellable;
- `triggers`: start, resume and cancel cycles;
- `celery_app`, `tasks`: the Celery wiring; `metrics`: Prometheus; `status`: `instructloop status`.

Redis keys: docs/REDIS-KEYS.md. Nothing is imported here, so importing one module does not load
Celery.
"""
