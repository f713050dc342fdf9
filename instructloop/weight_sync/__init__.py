"""Load new weights into a RUNNING vLLM engine, correctly.

Used by serving's hot swap (`reload_weights`, AsyncLLM) and by PPO rollouts
(`reload_weights_sync` / `load_state_dict_sync`, offline `vllm.LLM`).

Why not just `collective_rpc("reload_weights", ...)`: vLLM's in-place reload
(`vllm/model_executor/model_loader/reload/`) loads each layer into fresh tensors, re-runs that
layer's `process_weights_after_loading` and copies the result into the old storage. A layer that
receives no tensor from the checkpoint is skipped ("ParallelLMHead: Failed to load weights") and
keeps whatever its post-processing derived from the OLD weights. With tied embeddings (SmolLM2,
Llama-3.2 1B/3B, small Qwen2.5) `lm_head` shares `embed_tokens.weight` and is never in the
checkpoint: its storage receives the new values through `embed_tokens`, but on the CPU backend its
GEMM kernel (`lm_head.cpu_linear`: a oneDNN handle made by `dispatch_cpu_unquantized_gemm`, which
holds a reordered COPY of the weight) still multiplies by the old embedding. Logits then come from
the old head on top of the new network, and greedy tokens match neither transformers nor a fresh
engine. Whether oneDNN takes that path depends on the CPU and dtype (docs/VLLM-CPU.md); where it
does not, vLLM falls back to `F.linear` on the live weight and the plain reload happens to be
right.

The method here: vLLM's own layer-wise reload (which re-packs every loaded layer correctly), then
re-run `process_weights_after_loading` on every module whose parameter is shared with another
module (the tied head), then check that the head's kernel computes `x @ W.T` for the weight it
holds. On CUDA the head's post-processing is a no-op and its kernel reads the live weight, so the
same code should be right on the GPU `vllm` package too (same v1 reload path; untested on a GPU).

The parts:
- `checkpoint`: validation of a checkpoint (or state dict) against the running engine, before
  anything is paused, so a bad checkpoint changes nothing;
- `load`: the calls above, run in the caller's process; they pause, load, roll back a load that
  failed half way to the checkpoint served before, and resume;
- `staging`: where a state dict crosses to a worker in another process;
- `worker`: the worker extension, which runs inside vLLM's worker process. The engine must be
  started with `worker_extension_cls=WORKER_EXTENSION` (`engine_kwargs()`); calls go by method
  name through `collective_rpc`, so no functions are pickled (VLLM_ALLOW_INSECURE_SERIALIZATION
  off).

No torch, transformers or vLLM import at module level anywhere here: serving imports this package.
"""

from instructloop.weight_sync.checkpoint import (
    TensorSpec,
    read_safetensors_index,
    validate_checkpoint,
    warm_validation,
)
from instructloop.weight_sync.config import (
    WORKER_EXTENSION,
    WeightSyncConfig,
    WeightSyncError,
    engine_kwargs,
)
from instructloop.weight_sync.load import (
    LoadTimes,
    check_head,
    check_head_sync,
    load_state_dict_sync,
    reload_weights,
    reload_weights_sync,
    served_checkpoint,
)
from instructloop.weight_sync.worker import WeightSyncWorkerExtension

__all__ = [
    "WORKER_EXTENSION",
    "LoadTimes",
    "TensorSpec",
    "WeightSyncConfig",
    "WeightSyncError",
    "WeightSyncWorkerExtension",
    "check_head",
    "check_head_sync",
    "engine_kwargs",
    "load_state_dict_sync",
    "read_safetensors_index",
    "reload_weights",
    "reload_weights_sync",
    "served_checkpoint",
    "validate_checkpoint",
    "warm_validation",
]
