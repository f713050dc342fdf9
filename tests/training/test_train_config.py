"""Stage configs: files, overrides, type checks; and the `instructloop train` verbs."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from instructloop.cli import main
from instructloop.training.config import (
    ConfigError,
    PPOConfig,
    RewardModelConfig,
    SFTConfig,
    config_from_dict,
    load_config,
    parse_overrides,
)


def test_paper_defaults() -> None:
    sft, rm, ppo = SFTConfig(), RewardModelConfig(), PPOConfig()
    assert (sft.lr, sft.lr_final_fraction, sft.residual_dropout) == (9.65e-6, 0.1, 0.2)
    assert sft.adam_betas == (0.9, 0.95) and sft.warmup_steps == 0
    assert (rm.lr, rm.epochs, rm.lr_final_fraction) == (9e-6, 1, 0.1)
    assert (ppo.kl_coef, ppo.gamma_ptx, ppo.cliprange, ppo.gamma) == (0.02, 27.8, 0.2, 1.0)
    assert (ppo.ppo_epochs, ppo.temperature, ppo.warmup_steps) == (1, 1.0, 10)


def test_every_field_is_documented() -> None:
    import inspect

    import instructloop.training.config as mod

    src = inspect.getsource(mod)
    for cls in (SFTConfig, RewardModelConfig, PPOConfig):
        for f in dataclasses.fields(cls):
            # The line after each field's declaration is its docstring.
            decl = next(line for line in src.splitlines() if line.startswith(f"    {f.name}:"))
            nxt = src.splitlines()[src.splitlines().index(decl) + 1].strip()
            assert nxt.startswith('"""'), f"{cls.__name__}.{f.name} has no docstring"


def test_json_toml_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"lr": 1e-5, "adam_betas": [0.8, 0.9]}))
    (tmp_path / "c.toml").write_text('lr = 2e-5\nreward_model_path = "/rm"\nuse_lora = true\n')
    cfg = load_config(SFTConfig, tmp_path / "c.json", ["epochs=3", "val_path=null"])
    assert (cfg.lr, cfg.adam_betas, cfg.epochs, cfg.val_path) == (1e-5, (0.8, 0.9), 3, None)
    ppo = load_config(PPOConfig, tmp_path / "c.toml", ["output_dir=/tmp/x", "gamma_ptx=0"])
    assert ppo.lr == 2e-5 and ppo.use_lora is True and ppo.output_dir == "/tmp/x"
    assert ppo.gamma_ptx == 0.0 and isinstance(ppo.gamma_ptx, float)
    assert parse_overrides(["parent_version=3"]) == {"parent_version": 3}
    assert config_from_dict(PPOConfig, {"parent_version": 3, "gamma_ptx": 0}).parent_version == "3"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"bogus": 1}, "unknown SFTConfig field"),
        ({"epochs": "two"}, "epochs: expected an integer"),
        ({"epochs": 1.5}, "epochs: expected an integer"),
        ({"use_lora": 1}, "unknown"),
        ({"adam_betas": [0.9]}, "adam_betas: expected a list of 2"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"attn_implementation": "flash"}, "attn_implementation"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": 6, "grad_accum": 4}, "multiple of grad_accum"),
    ],
)
def test_bad_values_name_the_field(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict(SFTConfig, data)


def test_ppo_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of minibatch_size"):
        config_from_dict(PPOConfig, {"batch_size": 6, "minibatch_size": 4, "gamma_ptx": 0})
    with pytest.raises(ConfigError, match="needs ptx_path"):
        config_from_dict(PPOConfig, {"gamma_ptx": 1.0})
    with pytest.raises(ConfigError, match="kl_estimator"):
        config_from_dict(PPOConfig, {"kl_estimator": "k4", "gamma_ptx": 0})
    with pytest.raises(ConfigError, match="not valid toml"):
        (tmp_path / "x.toml").write_text("lr = = 1")
        load_config(PPOConfig, tmp_path / "x.toml")


def test_cli_train_sft(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_file = tmp_path / "sft.toml"
    cfg_file.write_text(
        f'model_path = "{tiny_model_dir}"\ntrain_path = "{data_dir / "sft.jsonl"}"\n'
        "batch_size = 16\nprogress = false\n"
    )
    out = tmp_path / "sft"
    rc = main(["train", "sft", "--config", str(cfg_file), "--set", f"output_dir={out}",
               "--set", "epochs=1", "--set", "lr=1e-3"])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpoint"] == str(out) and summary["stage"] == "sft"
    assert summary["config"]["epochs"] == 1 and summary["config"]["batch_size"] == 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["lr"] == 1e-3
    # Bad input: a clear message, exit 2, nothing written.
    rc = main(["train", "sft", "--config", str(cfg_file), "--set", "epochs=zero"])
    assert rc == 2 and "epochs: expected an integer" in capsys.readouterr().err
    rc = main(["train", "rm", "--set", f"output_dir={tmp_path / 'rm'}",
               "--set", f"train_path={tmp_path / 'missing.jsonl'}",
               "--set", f"model_path={tiny_model_dir}"])  # fmt: skip
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "rm").exists()
    assert main(["train", "ppo", "--show-config"]) == 0
    assert json.loads(capsys.readouterr().out)["gamma_ptx"] == 27.8


def test_offline_engine_env_fills_defaults_and_keeps_callers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from instructloop.training.runtime import offline_engine_env

    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    offline_engine_env(2.4)
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    # What the operator set stays.
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    offline_engine_env(1.0)
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "8"


def test_engine_dtype_float32_on_a_cpu_without_bf16(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A bf16 checkpoint samples in float32 on a CPU that only emulates bf16 (several times
    faster there), in bf16 where the CPU has it; float32 checkpoints and explicit dtypes stand."""
    import platform

    import torch

    from instructloop import hardware as common

    if platform.machine() == "x86_64":  # the real flags are read
        assert "sse2" in common.cpu_flags()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    for d, name in ((bf16, "bfloat16"), (fp32, "float32")):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"dtype": name}))
    monkeypatch.setattr(common, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert common.engine_dtype(bf16) == "float32"
    assert common.engine_dtype(bf16, "bfloat16") == "bfloat16"
    assert common.engine_dtype(fp32) == "float32"
    monkeypatch.setattr(common, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert common.engine_dtype(bf16) == "bfloat16"
    monkeypatch.setattr(common, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert common.engine_dtype(bf16) == "bfloat16"
    # A hub id: vLLM's own "auto" where bf16 is native, float32 where it is emulated.
    assert common.engine_dtype("org/model") == "auto"
    monkeypatch.setattr(common, "cpu_flags", lambda: frozenset({"avx2"}))
    assert common.engine_dtype("org/model") == "float32"
    from instructloop.training.ppo import rollout as training_common

    assert training_common.engine_dtype is common.engine_dtype  # one rule for every engine


def test_attention_kernels_eager_on_cpu_and_same_outputs(tiny_model_dir: Path) -> None:
    """ "auto" picks eager on the CPU (faster backward there) and sdpa elsewhere; an explicit
    choice stands; and the choice changes kernels, not results."""
    import torch
    from transformers import AutoModelForCausalLM

    from instructloop.training.models import attention_implementation, train_model_kwargs

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_implementation("auto", cpu) == "eager"
    assert attention_implementation("auto", cuda) == "sdpa"
    assert attention_implementation("sdpa", cpu) == "sdpa"
    kw = train_model_kwargs(PPOConfig(), cpu)
    assert kw == {"dtype": torch.float32, "attn_implementation": "eager"}
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kw)
    sdpa = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, **train_model_kwargs(PPOConfig(attn_implementation="sdpa"), cpu)
    )
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    ids = torch.tensor([[1, 5, 9, 13, 2, 7], [3, 4, 8, 0, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=attn).logits
        b = sdpa(input_ids=ids, attention_mask=attn).logits
    real = attn.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=1e-4)


def test_cpu_allocator_tuning_once_and_harmless() -> None:
    import sys

    import torch

    from instructloop.training.runtime import prepare_runtime, tune_cpu_allocator

    if not sys.platform.startswith("linux"):
        assert tune_cpu_allocator() is False
        return
    assert tune_cpu_allocator() is True
    assert tune_cpu_allocator() is True  # idempotent
    prepare_runtime(PPOConfig(), torch.device("cpu"))
    # Large blocks still allocate, free and hold their values.
    x = torch.ones(64, 1 << 20)
    assert float(x.sum()) == 64 * (1 << 20)
    del x


def test_read_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    from instructloop.training.datafiles import DataError, read_jsonl

    texts = ["a\u2028b", "c\u2029d\x85e", "f\x1cg\x1d\x1eh\x0bi\x0cj", "k\r\nl"]
    p = tmp_path / "rows.jsonl"
    p.write_text(
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\n\n",
        encoding="utf-8",
    )
    assert [r["text"] for r in read_jsonl(p, required=("text",))] == texts
    p.write_text('{"text": "ok"}\n{"text": "cut\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows.jsonl:2: not JSON"):
        read_jsonl(p)
