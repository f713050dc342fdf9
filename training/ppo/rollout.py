"""PPO's rollout engine: vLLM in-process (`vllm.LLM`), kept in step with the actor's weights.

Generation is most of RLHF's time (OpenRLHF: about 80%), so rollouts run on vLLM rather than
transformers' generate. After every PPO update the actor's weights are loaded into the running
engine (`instructloop.weight_sync.load_state_dict_sync`, which re-derives the tied head that vLLM's
plain in-place reload leaves stale; docs/INTERFACES.md), so each rollout comes from the current
policy. tests/training/test_ppo.py checks that against transformers' greedy decoding on the same
weights.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructloop.hardware import engine_dtype
from instructloop.training.runtime import offline_engine_env

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Rollout:
    """One sampled response. `response_ids` includes the EOS when the response ended on it."""

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    ended_with_eos: bool


class RolloutEngine:
    """A `vllm.LLM` for sampling responses from token-id prompts, whose weights can be replaced
    between `generate` calls. Close it (or use it as a context manager) to stop its processes."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int = 1024,
        seed: int = 0,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.3,
    ) -> None:
        # Read when the engine starts (so before vllm is imported); a small KV cache leaves room
        # for training.
        offline_engine_env(kv_cache_gib)
        from vllm import LLM

        from instructloop.weight_sync import engine_kwargs

        self.model_dir = str(model_dir)
        dtype = engine_dtype(self.model_dir, dtype)
        self.llm: Any = LLM(
            model=self.model_dir,
            dtype=dtype,  # type: ignore[arg-type]
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=True,  # no graph capture: faster start, and weights change every step
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=False,  # prompts rarely repeat within a step; weights change
            **engine_kwargs(),
        )
        self.max_model_len = max_model_len
        self.eos_ids = set(self._eos_ids())
        self.engine_dtype = self.llm.llm_engine.model_config.dtype

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        tok = self.llm.get_tokenizer()
        if tok.eos_token_id is not None:
            ids.append(int(tok.eos_token_id))
        gen_eos = getattr(self.llm.llm_engine.model_config.hf_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.append(gen_eos)
        elif isinstance(gen_eos, list):
            ids.extend(int(x) for x in gen_eos)
        return ids

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[Rollout]:
        """One sampled response per prompt (temperature 0 = greedy). No per-request seed: a
        seeded request can kill vLLM's CPU engine under load; the engine's own seed is set."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens
        )
        reqs = [{"prompt_token_ids": list(p)} for p in prompts]
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        result = []
        for p, o in zip(prompts, outs, strict=True):
            c = o.outputs[0]
            ids = list(c.token_ids)
            eos = bool(ids) and ids[-1] in self.eos_ids and c.finish_reason == "stop"
            result.append(Rollout(list(p), ids, c.text, eos))
        return result

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> float:
        """Load Hugging Face-named weights (merged, no LoRA names) into the running engine; cast
        to the engine's dtype first (half the bytes to move for bf16). Returns seconds taken."""
        from instructloop.weight_sync import load_state_dict_sync

        t0 = time.perf_counter()
        cast = {k: v.detach().to("cpu", self.engine_dtype) for k, v in state_dict.items()}
        load_state_dict_sync(self.llm, cast)
        return time.perf_counter() - t0

    def load_checkpoint(self, checkpoint_dir: str | Path) -> float:
        """Load a checkpoint directory of the same architecture into the running engine.
        Returns seconds taken."""
        from instructloop.weight_sync import reload_weights_sync

        t0 = time.perf_counter()
        reload_weights_sync(self.llm, checkpoint_dir)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the engine's processes and free its memory."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Rollout", "RolloutEngine"]
