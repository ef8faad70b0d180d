"""A third-party eviction policy, end to end: the example package
`examples/policy_plugin` (tova-knorm, the KNorm policy, registered through the
``tova_vllm.policies`` entry-point group) installed with pip into a temporary
directory, served by a real `vllm serve` subprocess that finds it on its
PYTHONPATH. Checked with the `openai` client: its option is a CLI flag, a
request may run it (and is counted under its name on /metrics), an option out
of range is HTTP 400 while the server carries on, and its greedy tokens equal
those of the transformers reference of the same policy.

Nothing is installed into the test environment: the package lives in the
temporary directory, and the test process imports it from there only for the
reference, restoring the policy registry afterwards.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from serve_helpers import VLLM_CLI, running_server, sample

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "policy_plugin"
SERVER_BUDGET = 32
BUDGET = 16
MAX_TOKENS = 24
OPTION = "kv_knorm_protect_recent"
PROMPT = (
    "The history of the lighthouse begins in the ancient world. The Pharos of "
    "Alexandria, built in the third century BC, guided ships into the harbour for "
    "centuries."
)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """The example installed with pip into a temporary directory (from a copy,
    so the build leaves nothing in the source tree)."""
    root = tmp_path_factory.mktemp("policy_plugin")
    src = root / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    out = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
            "--disable-pip-version-check", "--quiet", "--target", str(target), str(src),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (target / "tova_knorm" / "__init__.py").is_file()
    return target


@pytest.fixture(scope="module")
def plugin_env(plugin_dir) -> dict[str, str]:
    """The environment of the `vllm` subprocesses: the plugin on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(plugin_dir), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def knorm(plugin_dir):
    """The plugin's module, imported in this process from the temporary
    directory; afterwards sys.path, sys.modules and the policy registry are
    as before (other test modules see no `knorm`)."""
    from tova_vllm.policies import load_plugins, registry

    load_plugins()  # the built-in policies (and entry points) before the snapshot
    saved = dict(registry._REGISTRY), dict(registry._OPTION_KEYS)
    sys.path.insert(0, str(plugin_dir))
    importlib.invalidate_caches()
    try:
        module = importlib.import_module("tova_knorm")
        assert Path(module.__file__).resolve().is_relative_to(plugin_dir.resolve()), module.__file__
        yield module
    finally:
        sys.path.remove(str(plugin_dir))
        sys.modules.pop("tova_knorm", None)
        with registry._lock:
            registry._REGISTRY.clear()
            registry._REGISTRY.update(saved[0])
            registry._OPTION_KEYS.clear()
            registry._OPTION_KEYS.update(saved[1])


@pytest.fixture(scope="module")
def server(model_path, plugin_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_plugin") / "server.log"
    # serve_helpers starts the server with os.environ (and its own float32,
    # eager, 1 GiB KV-cache arguments): the plugin's PYTHONPATH goes there
    # for the start only.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", plugin_env["PYTHONPATH"])
        with running_server(model_path, log, "--kv-policy", "tova", "--kv-budget", str(SERVER_BUDGET)) as srv:
            mp.undo()
            yield srv


@pytest.fixture(scope="module")
def prompt_ids(model_path) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_path)(PROMPT, add_special_tokens=False).input_ids
    assert len(ids) > BUDGET
    return ids


def _complete(server, prompt_ids, **xargs):
    return server.client().completions.create(
        model=server.model,
        prompt=prompt_ids,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={
            "ignore_eos": True,
            "return_token_ids": True,
            "vllm_xargs": {"kv_policy": "knorm", "kv_budget": BUDGET, **xargs},
        },
    )


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------


def test_help_lists_the_plugin_option(plugin_env):
    out = subprocess.run(
        [VLLM_CLI, "serve", "--help=all"], capture_output=True, text=True, timeout=240, env=plugin_env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--kv-knorm-protect-recent" in out.stdout
    squashed = "".join(out.stdout.split())  # argparse wraps lines
    assert "".join("For --kv-policy knorm: most recent tokens always kept".split()) in squashed
    assert "'knorm':" in out.stdout  # in --kv-policy's list of policies


def test_knorm_request_matches_the_reference(server, prompt_ids, knorm, model_path):
    resp = _complete(server, prompt_ids)
    choice = resp.choices[0]
    got = list(getattr(choice, "token_ids", None) or [])
    assert resp.usage.prompt_tokens == len(prompt_ids) > BUDGET
    assert resp.usage.completion_tokens == MAX_TOKENS == len(got), resp

    # /metrics counts the request under the plugin's policy name.
    text = server.metrics()
    assert sample(text, "tova_vllm:requests_total", policy="knorm", model_name=server.model) >= 1

    # The transformers reference of the same policy and options, this process.
    from transformers import AutoModelForCausalLM

    from tova_vllm.config import KVSettings
    from tova_vllm.reference import generate_greedy

    hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    policy = knorm.KNorm()  # the defaults: what the request ran with
    assert policy.protect_recent == 1
    with torch.no_grad():
        want = generate_greedy(hf_model, [prompt_ids], KVSettings(policy, BUDGET), MAX_TOKENS)[0]
    del hf_model
    first = _first_divergence(got, want)
    assert first is None, (
        f"vLLM and the reference differ from token {first} on: vLLM {got[first:]} vs reference {want[first:]}"
        f" (vLLM {got}, reference {want})"
    )


def test_option_out_of_range_is_400_and_the_server_carries_on(server, prompt_ids):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        _complete(server, prompt_ids, **{OPTION: BUDGET})
    message = str(err.value)
    assert err.value.status_code == 400, message
    assert f"vllm_xargs.{OPTION}" in message and f"[0, {BUDGET - 1}]" in message, message
    assert server.get("/health")[0] == 200
    ok = _complete(server, prompt_ids, **{OPTION: BUDGET - 1})
    assert ok.usage.completion_tokens == MAX_TOKENS


def test_server_stops_and_leaves_no_process(server):
    alive = server.stop()
    assert server.proc.returncode is not None
    assert alive == [], [p.cmdline() for p in alive]
