"""Sampling from a policy with vLLM, for the data generators and the evaluation.

Product paths generate with vLLM, never HF `generate` (the service serves with vLLM, and it is
what makes rollouts affordable). One engine per call site: start it with `Sampler(model_dir)`,
reuse it for every batch, and `close()` it (or use `with`) to free its memory.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SamplerConfig:
    """vLLM engine settings for offline sampling on this project's machines."""

    dtype: str = "auto"  # instructloop.hardware.engine_dtype (float32 on a CPU without native bf16)
    # Context length; None = the model's own (max_position_embeddings), at most 2048.
    max_model_len: int | None = None
    # CPU KV cache in GiB (VLLM_CPU_KVCACHE_SPACE); ignored on GPUs.
    cpu_kvcache_gib: int = 1
    # GPU memory share when on CUDA (small: the trainer shares the device).
    gpu_memory_utilization: float = 0.3
    # Engine-level seed only: per-request seeds crash the CPU engine under load
    # (docs/VLLM-CPU.md, "Seeds and chunked prefill").
    seed: int = 0


def _context_length(model_dir: str, cap: int = 2048) -> int:
    """The model's max_position_embeddings (vLLM refuses more), capped: prompts here are short."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return min(cap, int(cfg.get("max_position_embeddings") or cap))
    except (OSError, ValueError, TypeError):
        return cap


def chat_prompt_text(tokenizer: Any, prompt: str | Messages) -> str:
    """The exact text the engine sees: the model's chat template applied, generation prompt on."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


@dataclass(frozen=True)
class Completion:
    prompt_text: str  # exactly what the engine saw
    text: str
    stopped: bool  # ended on EOS / a stop token, not on the length limit
    n_tokens: int


class Sampler:
    """A vLLM `LLM` over one model directory; prompts go through the model's chat template."""

    def __init__(self, model_dir: str | Path, cfg: SamplerConfig | None = None) -> None:
        self.cfg = cfg or SamplerConfig()
        from instructloop.training.runtime import offline_engine_env

        offline_engine_env(self.cfg.cpu_kvcache_gib)
        from vllm import LLM

        self.model_dir = str(model_dir)
        from instructloop.hardware import engine_dtype

        dtype = engine_dtype(self.model_dir, self.cfg.dtype)
        self.llm: Any = LLM(
            model=self.model_dir,
            dtype=dtype,
            max_model_len=self.cfg.max_model_len or _context_length(self.model_dir),
            enforce_eager=True,
            seed=self.cfg.seed,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def prompt_text(self, prompt: str | Messages) -> str:
        return chat_prompt_text(self.tokenizer, prompt)

    def sample(
        self,
        prompts: Sequence[str | Messages],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 128,
        chat: bool = True,
    ) -> list[list[str]]:
        """`n` completions per prompt (`chat=False`: prompts are raw text, no template)."""
        outs = self.sample_full(
            prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, chat=chat
        )
        return [[c.text for c in cs] for cs in outs]

    def sample_full(
        self,
        prompts: Sequence[str | Messages],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 128,
        chat: bool = True,
    ) -> list[list[Completion]]:
        """Like `sample`, with the prompt text the engine saw and why each completion stopped."""
        from vllm import SamplingParams

        if n < 1 or max_tokens < 1:
            raise ValueError("n and max_tokens must be >= 1")
        texts = [self.prompt_text(p) if chat else str(p) for p in prompts]
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        outs = self.llm.generate(texts, params, use_tqdm=False)
        return [
            [Completion(t, c.text, c.finish_reason == "stop", len(c.token_ids)) for c in o.outputs]
            for t, o in zip(texts, outs, strict=True)
        ]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            with _suppress():
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: object, e: object, tb: object) -> bool:
        return et is not None and issubclass(et, Exception)  # type: ignore[arg-type]
