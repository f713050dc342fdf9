"""`instructloop model init`: the bf16 safetensors directory is the GGUF model, faithfully."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_default_model_dir_is_complete(model_dir: Path) -> None:
    from instructloop.model_init import MARKER, is_model_dir

    assert is_model_dir(model_dir)
    assert (model_dir / MARKER).is_file()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    tok_cfg = (model_dir / "tokenizer_config.json").read_text()
    assert "chat_template" in tok_cfg or (model_dir / "chat_template.jinja").is_file()


def test_converted_weights_match_the_gguf(model_dir: Path) -> None:
    """Every saved tensor is transformers' own GGUF dequantisation, rounded to bf16, and the
    greedy next tokens agree."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructloop.model_init import find_gguf

    gguf = find_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    for name, tensor in ref_sd.items():
        assert torch.equal(tensor.to(torch.bfloat16), our_sd[name]), name
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = ref(ids).logits
        b = ours.float()(ids).logits
    assert torch.equal(a[0, -1].topk(3).indices, b[0, -1].topk(3).indices)


def test_chat_template_renders_messages(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in text and text.rstrip().endswith("assistant")


def test_init_is_idempotent_and_atomic(model_dir: Path, tmp_path: Path) -> None:
    from instructloop.model_init import init_default_model

    msgs: list[str] = []
    assert init_default_model(model_dir, progress=msgs.append) == model_dir
    assert any("already exists" in m for m in msgs)
    # No temporary directories are left beside the model.
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import instructloop.model_init as mi

    monkeypatch.setattr(mi, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(mi.ModelInitError, match="not installed"):
        mi.find_gguf()
