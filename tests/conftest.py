"""Shared test setup: the embedded model and real vLLM engines on the CPU.

Engines are expensive to start (tens of seconds here), so test modules share
one per module (see `vllm_engine`)."""

from __future__ import annotations

import contextlib
import gc
import os

import pytest

import model_runners

# vLLM on the CPU reserves most of the RAM for the KV cache by default and
# refuses to start when other processes hold memory; tests use a small cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# LLM.collective_rpc with a test function (inspecting worker state) pickles it.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

ENGINE_DEFAULTS = dict(
    dtype="float32",
    max_model_len=1024,
    enforce_eager=True,  # no torch.compile warm-up: much faster engine start
    seed=0,
    max_num_seqs=32,
)


def pytest_addoption(parser):
    parser.addoption(
        model_runners.OPTION,
        choices=("default", "v2"),
        default="default",
        help="vLLM model runner of the engine tests: the one vLLM picks (every test), or "
        f"Model Runner V2 under Triton's interpreter (the tests marked {model_runners.MARKER} only)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{model_runners.MARKER}: also run on Model Runner V2 (pytest {model_runners.OPTION}=v2)"
    )
    if config.getoption(model_runners.OPTION) == "v2":
        model_runners.use_v2()


def pytest_collection_modifyitems(config, items):
    if config.getoption(model_runners.OPTION) != "v2":
        return
    selected = [item for item in items if item.get_closest_marker(model_runners.MARKER)]
    deselected = [item for item in items if not item.get_closest_marker(model_runners.MARKER)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.fixture(scope="session")
def model_path() -> str:
    from tova_vllm.models import default_model

    return default_model()


@contextlib.contextmanager
def vllm_engine(model: str, **kwargs):
    """A real vLLM ``LLM`` on the CPU, shut down (engine processes joined) on exit."""
    from vllm import LLM

    llm = LLM(model=model, **{**ENGINE_DEFAULTS, **kwargs})
    try:
        model_runners.check_runner(llm)
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.fixture(scope="session")
def chat_prompts(model_path) -> list[str]:
    """Eight prompts of clearly different lengths (about 15 to 250 tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    topics = [
        "Say hello.",
        "What is the capital of France?",
        "Write a haiku about the sea and the wind over the harbour at night.",
        "Explain how a steam engine works, in simple words, for a ten year old child.",
        "List the planets of the solar system in order and give one fact about each.",
        "Summarise the plot of Romeo and Juliet. " + "Mention the families, the balcony, "
        "the duel, the potion and the ending in the tomb. " * 2,
        "Tell a long story about a fox and a crow. " + "The fox was clever and the crow was "
        "proud, and the cheese was large and yellow. " * 5,
        "Describe the water cycle in detail. " + "Evaporation, condensation, precipitation "
        "and collection all matter; explain each stage with an example from daily life. " * 8,
    ]
    return [
        tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in topics
    ]
