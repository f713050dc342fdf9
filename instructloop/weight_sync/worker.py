"""The worker side: runs inside vLLM's worker process as its `worker_extension_cls`
(config.WORKER_EXTENSION). The caller reaches these methods by name through `collective_rpc`
(RPC_LOAD, RPC_CHECK_HEAD), so nothing is pickled.

torch and vLLM are imported inside the methods: the caller's process imports this module too
(through the package) and must stay light.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

RPC_LOAD = "instructloop_load_weights"
"""WeightSyncWorkerExtension.instructloop_load_weights, by name."""
RPC_CHECK_HEAD = "instructloop_check_head"
"""WeightSyncWorkerExtension.instructloop_check_head, by name."""

_HEAD_TOLERANCE = 0.05  # relative; bf16 kernels differ from an fp32 reference by ~1e-2


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); its methods run in the worker,
    where `self.model_runner` and `self.reload_weights` are vLLM's. Method names carry a prefix so
    they cannot clash with vLLM's own worker attributes."""

    def instructloop_load_weights(
        self,
        weights_path: str | None = None,
        tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
        check_head: bool = True,
    ) -> dict[str, Any]:
        import torch

        t0 = time.perf_counter()
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        with torch.no_grad():
            try:
                if tensors is not None:
                    weights = ((n, t.detach()) for n, t in tensors)
                    self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]
                else:
                    self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
            except BaseException:
                _abandon_partial_reload(model)
                raise
            reprocessed = _reprocess_shared_modules(model)
            if check_head:
                err = _head_error(model)
                if err > _HEAD_TOLERANCE:
                    raise RuntimeError(
                        f"lm_head kernel disagrees with its weight after loading (relative "
                        f"error {err:.3g})"
                    )
        return {"seconds": time.perf_counter() - t0, "reprocessed": reprocessed}

    def instructloop_check_head(self) -> float:
        import torch

        with torch.no_grad():
            return _head_error(self.model_runner.get_model())  # type: ignore[attr-defined]


def _abandon_partial_reload(model: torch.nn.Module) -> None:
    """Undo the bookkeeping of a layer-wise reload that raised half way, so that the next reload
    (the rollback) starts clean.

    vLLM leaves layers it had not reached on the meta device with wrapped loaders, and the failing
    layer with the bad tensor buffered; a second reload would skip re-initialising them and replay
    the bad tensor. Putting every pending layer's original (kernel) tensors back leaves a model
    whose layers hold either their old or their new weights, each consistently processed, which
    a full reload then overwrites. Uses vLLM internals (reload/layerwise.py in vllm 0.32); if they
    change, this raises and the rollback reports the engine as inconsistent.
    """
    from vllm.model_executor.model_loader.reload import layerwise

    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    for layer in model.modules():
        info = layerwise.LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load():
            continue
        if info.kernel_tensors is not None:
            layerwise._place_kernel_tensors(layer, info)
        info.reset()
    layerwise.LOADING_LAYERS.clear()


def _reprocess_shared_modules(model: torch.nn.Module) -> list[str]:
    """Re-run weight post-processing on modules that share a parameter with another module.

    vLLM's in-place reload skips a module that got no checkpoint tensor; a tied lm_head gets its
    new values only through the shared storage, so whatever its post-processing derived from the
    weight (the CPU backend's prepacked GEMM weight) is stale until re-derived here.
    """
    owners: dict[int, list[str]] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for mod_name, mod in modules.items():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mod_name)
    shared = sorted({m for names in owners.values() if len(names) > 1 for m in names})
    done = []
    for mod_name in shared:
        mod = modules[mod_name]
        process = getattr(getattr(mod, "quant_method", None), "process_weights_after_loading", None)
        if process is None:
            continue
        weight = getattr(mod, "weight", None)
        if weight is not None and weight.numel() == 0:
            # Post-processing consumed the weight (a repacked linear): nothing left to re-derive
            # from. No tied module does this in vLLM today; fail loudly if one starts to.
            raise RuntimeError(f"{mod_name}: its shared weight was consumed by post-processing")
        process(mod)
        done.append(mod_name)
    return done


def _head_error(model: torch.nn.Module) -> float:
    """Relative max error of the logits head's kernel against x @ W.T (0.0 if not checkable)."""
    import torch

    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    quant_method = getattr(head, "quant_method", None)
    if weight is None or quant_method is None or weight.numel() == 0 or weight.ndim != 2:
        return 0.0
    if type(quant_method).__name__ not in ("UnquantizedEmbeddingMethod", "UnquantizedLinearMethod"):
        return 0.0  # a quantized head has no plain weight to compare with
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
    got = quant_method.apply(head, x).float()
    want = torch.nn.functional.linear(x.float(), weight.float())
    return (got - want).abs().max().item() / (want.abs().max().item() + 1e-6)
