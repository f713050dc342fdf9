"""Checkpoint verification (instructloop/registry/verify.py) and what the registry does with it:
the probe's truncated, random-byte, wrong-architecture and symlinked checkpoints are refused
with a one-line reason and change nothing; a version that was not verified goes live only with
force; `instructloop model register` and `model verify` say why. No engine here (the load check
and the serving side: tests/serving/test_serving_fallback.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from instructloop.paths import CHECKPOINT_ROOTS_ENV
from instructloop.registry import (
    AsyncModelRegistry,
    CheckpointRejected,
    ModelPathError,
    ModelRegistry,
    UnverifiedVersion,
    verify_checkpoint,
)
from tests.support.checkpoints import BROKEN, broken_checkpoint
from tests.support.models import build_tiny_llama
from tests.support.redis_state import db_state

REPO = Path(__file__).resolve().parents[1]
# The reason each broken checkpoint is refused with (a word of it).
REASONS = {
    "truncated": "truncated",
    "random_bytes": "not a safetensors file",
    "architecture": "wrong shapes",
    "symlink": "outside the checkpoint roots",
}


@pytest.fixture(scope="module")
def tiny(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid tiny checkpoint (the default model's tokenizer and chat template)."""
    return build_tiny_llama(tmp_path_factory.mktemp("verify") / "tiny", model_dir)


@pytest.fixture(scope="module")
def broken(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    return {how: broken_checkpoint(tiny, root / how, how) for how in BROKEN}


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def reject(path: Path, **kw: Any) -> str:
    with pytest.raises(CheckpointRejected) as e:
        verify_checkpoint(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg, msg  # one line
    return msg


# --- the verifier --------------------------------------------------------------------------------


def test_a_good_checkpoint_verifies(tiny: Path) -> None:
    s = verify_checkpoint(tiny)
    assert (s.path, s.architecture, s.dtype, s.verified) == (
        tiny.resolve(), "LlamaForCausalLM", "F32", "static"
    )  # fmt: skip
    # tie_word_embeddings: lm_head is not stored, and the embedding counts once
    assert s.tensors == 2 * 9 + 2 and s.parameters > 0


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_a_checkpoint_as_training_writes_it_verifies(
    tiny: Path, tmp_path: Path, save_dtype: str
) -> None:
    """What the training cycle registers (training/checkpoint.py: tied head dropped, config's
    dtype set to what is on disk, the stage's tokenizer and chat template, a manifest)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructloop.training.checkpoint import write_checkpoint

    out = write_checkpoint(
        tmp_path / "ppo",
        model=AutoModelForCausalLM.from_pretrained(str(tiny)),
        tokenizer=AutoTokenizer.from_pretrained(str(tiny)),
        stage="ppo", config={}, metrics={"reward": 0.5}, parent_path=str(tiny),
        parent_version="v1", data_snapshot="snap", save_dtype=save_dtype,
    )  # fmt: skip
    s = verify_checkpoint(out.path)
    assert s.dtype == {"float32": "F32", "bfloat16": "BF16"}[save_dtype] and s.tensors == 20


def test_the_probes_checkpoints_are_refused(broken: dict[str, Path]) -> None:
    for how in BROKEN:
        msg = reject(broken[how])
        assert REASONS[how] in msg, (how, msg)
        assert str(broken[how]) in msg  # it names the checkpoint


def test_weights_must_cover_their_file_exactly(tiny: Path, tmp_path: Path) -> None:
    padded = copy(tiny, tmp_path / "padded")
    with (padded / "model.safetensors").open("ab") as f:
        f.write(b"\0" * 16)
    assert "trailing bytes" in reject(padded)
    short = copy(tiny, tmp_path / "short")
    (short / "model.safetensors").write_bytes(b"\x01\x02")
    assert "too short" in reject(short)
    # a header that promises a tensor bigger than its byte range
    lying = copy(tiny, tmp_path / "lying")
    raw = (lying / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["shape"] = [65]
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    (lying / "model.safetensors").write_bytes(raw[:8] + new + raw[8 + n :])
    assert "model.norm.weight spans 256 bytes" in reject(lying)


def test_index_files_must_exist_and_agree(tiny: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    sharded = copy(tiny, tmp_path / "sharded")
    names = sorted(load_file(str(sharded / "model.safetensors")))
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors")}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert verify_checkpoint(sharded).tensors == len(names)
    index["weight_map"][names[0]] = "model-00002-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors, which does not exist" in reject(sharded)
    index["weight_map"][names[0]] = "../../etc/passwd"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "not a file in the directory" in reject(sharded)
    del index["weight_map"][names[0]]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert f"not in the index: {names[0]}" in reject(sharded)


def test_tensors_must_match_the_architecture_and_dtype(tiny: Path, tmp_path: Path) -> None:
    layers = copy(tiny, tmp_path / "layers")
    cfg = json.loads((layers / "config.json").read_text())
    (layers / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    assert "missing tensors model.layers.2." in reject(layers)
    (layers / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    assert "unknown tensors model.layers.1." in reject(layers)
    (layers / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    assert "dtypes other than config.json's bfloat16" in reject(layers)
    (layers / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-model"}))
    assert "not a usable config" in reject(layers)
    (layers / "config.json").unlink()
    assert "has no config.json" in reject(layers)


def test_a_stored_tied_head_is_allowed(tiny: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tied = copy(tiny, tmp_path / "tied")
    state = load_file(str(tied / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
    save_file(state, str(tied / "model.safetensors"), metadata={"format": "pt"})
    assert verify_checkpoint(tied).tensors == 2 * 9 + 3


def test_tokenizer_and_chat_template_must_be_there(tiny: Path, tmp_path: Path) -> None:
    no_tok = copy(tiny, tmp_path / "no_tok")
    (no_tok / "tokenizer.json").unlink()
    assert "has no tokenizer" in reject(no_tok)
    bad_tok = copy(tiny, tmp_path / "bad_tok")
    (bad_tok / "tokenizer.json").write_text("{not json")
    assert "the tokenizer does not load" in reject(bad_tok)
    no_tpl = copy(tiny, tmp_path / "no_tpl")
    (no_tpl / "chat_template.jinja").unlink()
    cfg = json.loads((no_tpl / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_tpl / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert "has no chat template" in reject(no_tpl)
    bad_tpl = copy(tiny, tmp_path / "bad_tpl")
    (bad_tpl / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content ")
    assert "the chat template does not render" in reject(bad_tpl)
    from transformers import AutoTokenizer

    more = copy(tiny, tmp_path / "more_tokens")
    tok = AutoTokenizer.from_pretrained(str(more))
    tok.add_tokens(["<an-extra-token>"])
    tok.save_pretrained(str(more))
    assert f"the tokenizer has {len(tok)} tokens but the embedding has" in reject(more)


def test_paths_and_symlinks_must_stay_under_the_roots(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    root.mkdir()
    outside = copy(tiny, other / "ckpt")
    msg = reject(outside, roots=[root])
    assert "lies outside the checkpoint roots" in msg and CHECKPOINT_ROOTS_ENV in msg
    # a directory link inside the roots to a checkpoint outside them
    (root / "link").symlink_to(outside, target_is_directory=True)
    assert "lies outside the checkpoint roots" in reject(root / "link", roots=[root])
    # a file link that leaves them, and one that stays
    inside = copy(tiny, root / "ckpt")
    (inside / "config.json").unlink()
    (inside / "config.json").symlink_to(outside / "config.json")
    assert "config.json is a symlink to" in reject(inside, roots=[root])
    (inside / "config.json").unlink()
    shutil.copyfile(outside / "config.json", root / "shared-config.json")
    (inside / "config.json").symlink_to(root / "shared-config.json")
    assert verify_checkpoint(inside, roots=[root]).verified == "static"
    (inside / "dangling").symlink_to(root / "nothing-here")
    assert "broken or looping symlink" in reject(inside, roots=[root])
    (inside / "dangling").unlink()
    # the configured roots: the data directory plus INSTRUCTLOOP_CHECKPOINT_ROOTS
    monkeypatch.setenv(CHECKPOINT_ROOTS_ENV, str(root))
    assert "outside the checkpoint roots" in reject(outside)
    monkeypatch.setenv(CHECKPOINT_ROOTS_ENV, f"{root}:{other}")
    assert verify_checkpoint(outside).verified == "static"


# --- the registry ------------------------------------------------------------------------------


@pytest.fixture
def reg(redis_client: Any) -> ModelRegistry:
    return ModelRegistry(redis_client)


def test_register_refuses_bad_checkpoints_and_changes_nothing(
    reg: ModelRegistry, redis_client: Any, tiny: Path, broken: dict[str, Path]
) -> None:
    good = reg.register(tiny, source="init")
    assert good.verified == "static"
    before = db_state(redis_client)
    for how in BROKEN:
        with pytest.raises(CheckpointRejected, match=REASONS[how]):
            reg.register(broken[how], source="register")
    with pytest.raises(CheckpointRejected, match="outside the checkpoint roots"):
        reg.register(tiny, source="register", roots=[tiny.parent / "elsewhere"])
    # the roots hold even without verification
    with pytest.raises(CheckpointRejected, match="outside the checkpoint roots"):
        reg.register(broken["symlink"], source="register", verify=None)
    assert db_state(redis_client) == before
    assert issubclass(CheckpointRejected, ModelPathError)  # callers that caught it still do


async def test_the_async_registry_verifies_too(
    redis_client: Any, redis_url: str, tiny: Path, broken: dict[str, Path]
) -> None:
    reg = AsyncModelRegistry(redis_url)
    try:
        for how in BROKEN:
            with pytest.raises(CheckpointRejected, match=REASONS[how]):
                await reg.register(broken[how], source="register")
        assert (await reg.register(tiny, source="init")).verified == "static"
        assert [m.version for m in await reg.list()] == ["v1"]
    finally:
        await reg.close()


def test_promote_refuses_an_unverified_version_unless_forced(
    reg: ModelRegistry, redis_client: Any, tiny: Path, broken: dict[str, Path], tmp_path: Path
) -> None:
    v1 = reg.register(tiny, source="init")
    reg.promote(v1.version)
    # What an operator could do before verification existed: register a truncated checkpoint.
    bad = reg.register(broken["truncated"], source="register", verify=None)
    assert bad.verified is None
    before = db_state(redis_client)
    with pytest.raises(UnverifiedVersion, match="was not verified"):
        reg.promote(bad.version)
    assert db_state(redis_client) == before and reg.live() == v1
    # An operator's force still makes it live (a replica then refuses to swap to it).
    reg.promote(bad.version, force=True)
    assert reg.live() == reg.get(bad.version)
    reg.promote(v1.version)

    # A version registered before verification existed has no flag: unverified. Registering
    # its directory again verifies it and records that.
    legacy = reg.register(copy(tiny, tmp_path / "legacy"), source="register")
    redis_client.hdel(f"il:models:v:{legacy.version}", "verified")
    assert reg.get(legacy.version).verified is None
    with pytest.raises(UnverifiedVersion):
        reg.promote(legacy.version)
    again = reg.register(tmp_path / "legacy", source="register")
    assert again.version == legacy.version and again.verified == "static"
    reg.promote(legacy.version)
    assert reg.live() is not None and reg.live().version == legacy.version  # type: ignore[union-attr]
    # an unverified registration never downgrades a verified version
    assert reg.register(tmp_path / "legacy", source="x", verify=None).verified == "static"


# --- the CLI -----------------------------------------------------------------------------------


def cli(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "instructloop", *args],
        env={**os.environ, "REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_register_and_verify_say_why(
    redis_client: Any, redis_url: str, tiny: Path, broken: dict[str, Path]
) -> None:
    before = db_state(redis_client)
    bad = cli("model", "register", str(broken["truncated"]), redis_url=redis_url)
    assert bad.returncode == 1 and bad.stdout == ""
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("error: ") and "truncated" in line
    assert db_state(redis_client) == before
    ok = cli("model", "verify", str(tiny), redis_url=redis_url)
    assert ok.returncode == 0 and "LlamaForCausalLM" in ok.stdout and "static" in ok.stdout
    bad = cli("model", "verify", str(broken["symlink"]), redis_url=redis_url)
    assert bad.returncode == 1 and "outside the checkpoint roots" in bad.stderr
    good = cli("model", "register", str(tiny), redis_url=redis_url)
    assert good.returncode == 0 and good.stdout.strip() == "v1", good.stderr
    assert "verified (static)" in good.stderr
    listed = cli("model", "list", redis_url=redis_url)
    assert "verified static" in listed.stdout


@pytest.mark.slow
@pytest.mark.engine
def test_verify_load_starts_an_engine_and_generates(
    redis_client: Any, redis_url: str, tiny: Path, tmp_path: Path
) -> None:
    """`--verify-load`: a checkpoint that passes the file checks but names an architecture the
    engine does not know is refused; a good one is registered as verified by a load."""
    unknown = copy(tiny, tmp_path / "unknown_arch")
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(
        json.dumps({**cfg, "architectures": ["NoSuchModelForCausalLM"]})
    )
    assert verify_checkpoint(unknown).verified == "static"
    msg = reject(unknown, how="load")
    assert "the engine did not load it" in msg and "NoSuchModelForCausalLM" in msg, msg

    reg = ModelRegistry(redis_client)
    v1 = reg.register(tiny, source="init")
    assert v1.verified == "static"
    out = cli("model", "register", "--verify-load", str(tiny), redis_url=redis_url)
    assert out.returncode == 0 and out.stdout.strip() == v1.version, out.stderr
    assert reg.get(v1.version).verified == "load"


def test_a_process_without_torch_verifies_in_a_child(tiny: Path, broken: dict[str, Path]) -> None:
    """The training worker registers candidates at the gate step: the checks must not leave
    torch and transformers in its memory."""
    code = (
        "import sys\n"
        "from instructloop.registry.verify import CheckpointRejected, verify_checkpoint\n"
        f"print(verify_checkpoint({str(tiny)!r}).describe())\n"
        "try:\n"
        f"    verify_checkpoint({str(broken['truncated'])!r})\n"
        "except CheckpointRejected as e:\n"
        "    print('rejected:', e)\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "LlamaForCausalLM" in lines[0] and "verified: static" in lines[0]
    assert lines[1].startswith("rejected:") and "truncated" in lines[1]
    assert lines[-1] == "torch loaded: False"
