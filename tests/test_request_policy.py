"""Per-request settings (SamplingParams.extra_args / vllm_xargs,
`tova_vllm.config.request_settings`): what a request may choose, and the
errors naming the field and its allowed values."""

from __future__ import annotations

import pytest

from tova_vllm.config import (
    KVSettings,
    PolicyConfigError,
    engine_settings,
    request_settings,
    settings_keys,
)
from tova_vllm.policies import H2O, TOVA, PolicyOptionError, Sink, Window

ENGINE = KVSettings(TOVA(), 64)
ALL_KEYS = "kv_policy, kv_budget, kv_prompt_mode, kv_prompt_chunk, kv_num_sinks, kv_h2o_recent_ratio"


def test_no_settings_is_the_engine_settings():
    assert request_settings(ENGINE, None) is ENGINE
    assert request_settings(ENGINE, {}) is ENGINE
    assert request_settings(ENGINE, {"other_plugin_key": 1}) is ENGINE
    # Naming the engine's own values gives the engine's settings back.
    assert request_settings(ENGINE, {"kv_policy": "tova", "kv_budget": 64}) is ENGINE
    assert request_settings(None, None) is None
    assert request_settings(None, {"unrelated": True}) is None


def test_engine_settings_parse():
    assert engine_settings(None) is None
    assert engine_settings({"kv_policy": "none"}) is None
    assert engine_settings({"kv_policy": "tova", "kv_budget": 64}) == ENGINE
    # CLI / JSON strings of numbers are fine at the engine level.
    s = engine_settings({"kv_policy": "SINK", "kv_budget": "8", "kv_num_sinks": "2"})
    assert s == KVSettings(Sink(num_sinks=2), 8)
    s = engine_settings({"kv_policy": "tova", "kv_budget": 8, "kv_prompt_mode": "chunked", "kv_prompt_chunk": 4})
    assert s == KVSettings(TOVA(), 8, "chunked", 4) and s.chunk == 4
    assert KVSettings(TOVA(), 8, "chunked").chunk == 8  # default chunk: the budget
    assert KVSettings.from_json(s.to_json()) == s
    with pytest.raises(PolicyConfigError, match=r"^kv_budget=4 was given without kv_policy"):
        engine_settings({"kv_budget": 4})
    with pytest.raises(PolicyConfigError, match=r"^kv_policy='tova' needs kv_budget"):
        engine_settings({"kv_policy": "tova"})
    with pytest.raises(PolicyConfigError, match=r"^kv_budgett is not a KV setting; allowed keys: " + ALL_KEYS):
        engine_settings({"kv_policy": "tova", "kv_budget": 4, "kv_budgett": 4})


def test_a_request_picks_its_policy_budget_options_and_prompt_mode():
    s = request_settings(ENGINE, {"kv_policy": "sink", "kv_budget": 16, "kv_num_sinks": 2})
    assert s == KVSettings(Sink(num_sinks=2), 16)
    s = request_settings(ENGINE, {"kv_policy": "H2O", "kv_h2o_recent_ratio": 0.25, "kv_prompt_mode": "stream"})
    assert s == KVSettings(H2O(recent_ratio=0.25), 64, "stream")
    s = request_settings(ENGINE, {"kv_policy": "window", "kv_prompt_mode": "chunked", "kv_prompt_chunk": 8})
    assert s == KVSettings(Window(), 64, "chunked", 8) and s.chunk == 8
    s = request_settings(ENGINE, {"kv_policy": "keydiff", "kv_budget": 1})
    assert s.name == "keydiff" and s.budget == 1
    # Integral floats are not integers: refused (JSON clients send 16, not 16.0).
    with pytest.raises(PolicyConfigError):
        request_settings(ENGINE, {"kv_budget": 16.0})


def test_options_are_inherited_from_the_engines_policy_and_fitted_to_the_budget():
    engine_sink = KVSettings(Sink(num_sinks=8), 64)
    # The engine's sink count follows its policy...
    assert request_settings(engine_sink, {"kv_budget": 32}) == KVSettings(Sink(num_sinks=8), 32)
    assert request_settings(engine_sink, {"kv_policy": "sink"}) is engine_sink
    # ... clipped below a smaller budget.
    assert request_settings(engine_sink, {"kv_budget": 5}) == KVSettings(Sink(num_sinks=4), 5)
    assert request_settings(engine_sink, {"kv_budget": 1}) == KVSettings(Sink(num_sinks=0), 1)
    # Another policy starts from its defaults, fitted as well.
    engine_window = KVSettings(Window(), 64)
    assert request_settings(engine_window, {"kv_policy": "sink", "kv_budget": 3}) == KVSettings(Sink(num_sinks=2), 3)
    assert request_settings(engine_window, {"kv_policy": "sink"}) == KVSettings(Sink(), 64)
    engine_h2o = KVSettings(H2O(recent_ratio=0.25), 64, "chunked", 16)
    s = request_settings(engine_h2o, {"kv_budget": 16})
    assert s == KVSettings(H2O(recent_ratio=0.25), 16, "chunked", 16)
    assert request_settings(engine_h2o, {"kv_policy": "h2o", "kv_h2o_recent_ratio": 0.75}).policy == H2O(0.75)
    # A request's own value is checked against its own budget, not fitted.
    with pytest.raises(PolicyOptionError, match=r"^vllm_xargs\.kv_num_sinks must be an integer in \[0, 4\]"):
        request_settings(engine_sink, {"kv_budget": 5, "kv_num_sinks": 8})


@pytest.mark.parametrize(
    "extra,field,allowed",
    [
        ({"kv_budget": 65}, "kv_budget", "[1, 64]"),
        ({"kv_budget": 0}, "kv_budget", "[1, 64]"),
        ({"kv_budget": -3}, "kv_budget", "[1, 64]"),
        ({"kv_budget": "12"}, "kv_budget", "[1, 64]"),  # strings refused per request
        ({"kv_budget": True}, "kv_budget", "[1, 64]"),  # booleans are not integers
        ({"kv_budgett": 32}, "kv_budgett", "allowed keys: " + ALL_KEYS),
        ({"kv_policy": "lru"}, "kv_policy", "tova, window, sink, h2o, keydiff"),
        ({"kv_policy": 3}, "kv_policy", "tova, window, sink, h2o, keydiff"),
        ({"kv_policy": "sink", "kv_budget": 4, "kv_num_sinks": 4}, "kv_num_sinks", "[0, 3]"),
        ({"kv_policy": "sink", "kv_num_sinks": "2"}, "kv_num_sinks", "[0, 63]"),
        ({"kv_policy": "sink", "kv_num_sinks": True}, "kv_num_sinks", "[0, 63]"),
        ({"kv_policy": "sink", "kv_num_sinks": -1}, "kv_num_sinks", "[0, 63]"),
        ({"kv_num_sinks": 2}, "kv_num_sinks", "kv_policy='sink' only"),
        ({"kv_policy": "h2o", "kv_num_sinks": 2}, "kv_num_sinks", "kv_policy='sink' only"),
        ({"kv_policy": "h2o", "kv_h2o_recent_ratio": 0}, "kv_h2o_recent_ratio", "(0, 1)"),
        ({"kv_policy": "h2o", "kv_h2o_recent_ratio": 1.0}, "kv_h2o_recent_ratio", "(0, 1)"),
        ({"kv_policy": "h2o", "kv_h2o_recent_ratio": True}, "kv_h2o_recent_ratio", "(0, 1)"),
        ({"kv_policy": "h2o", "kv_h2o_recent_ratio": "0.5"}, "kv_h2o_recent_ratio", "(0, 1)"),
        ({"kv_policy": "h2o", "kv_h2o_recent_ratio": float("nan")}, "kv_h2o_recent_ratio", "(0, 1)"),
        ({"kv_h2o_recent_ratio": 0.5}, "kv_h2o_recent_ratio", "kv_policy='h2o' only"),
        ({"kv_prompt_mode": "eager"}, "kv_prompt_mode", "bulk, chunked, stream"),
        ({"kv_prompt_chunk": 8}, "kv_prompt_chunk", "kv_prompt_mode='chunked' only"),
        ({"kv_prompt_mode": "stream", "kv_prompt_chunk": 8}, "kv_prompt_chunk", "kv_prompt_mode='chunked' only"),
        ({"kv_prompt_mode": "chunked", "kv_prompt_chunk": 0}, "kv_prompt_chunk", "a positive integer"),
        ({"kv_prompt_mode": "chunked", "kv_prompt_chunk": True}, "kv_prompt_chunk", "a positive integer"),
        ({"kv_prompt_mode": "chunked", "kv_prompt_chunk": "8"}, "kv_prompt_chunk", "a positive integer"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(extra, field, allowed):
    # PolicyOptionError is the base of PolicyConfigError; see the next test
    # for the documented (narrower) type.
    with pytest.raises(PolicyOptionError) as info:
        request_settings(ENGINE, extra)
    message = str(info.value)
    assert message.startswith(f"vllm_xargs.{field} ") and allowed in message, message


@pytest.mark.parametrize(
    "extra",
    [
        {"kv_policy": "sink", "kv_budget": 4, "kv_num_sinks": 4},
        {"kv_policy": "sink", "kv_num_sinks": -1},
        {"kv_policy": "h2o", "kv_h2o_recent_ratio": 0},
        {"kv_policy": "h2o", "kv_h2o_recent_ratio": True},
    ],
)
def test_out_of_range_options_raise_policy_config_error(extra):
    """`request_settings` documents `PolicyConfigError`, and the vLLM seams
    (patch/request_params.py, patch/kv_cache_manager.py) catch only that
    type: an option out of its range must be one too."""
    with pytest.raises(PolicyConfigError):
        request_settings(ENGINE, extra)


def test_a_bulk_request_on_a_chunked_engine_drops_the_chunk():
    """A request switching a ``chunked`` engine's prompts to another mode must
    not carry the engine's chunk (such settings do not round-trip)."""
    engine = KVSettings(TOVA(), 64, "chunked", 16)
    s = request_settings(engine, {"kv_prompt_mode": "bulk"})
    assert s.prompt_mode == "bulk"
    assert KVSettings.from_json(s.to_json()) == s


def test_settings_on_an_engine_without_a_policy_are_refused():
    for key in settings_keys():
        with pytest.raises(PolicyConfigError, match=rf"^vllm_xargs\.{key} needs a server started with"):
            request_settings(None, {key: 32})
    with pytest.raises(PolicyConfigError, match=r"vllm_xargs\.kv_budgett needs a server started with"):
        request_settings(None, {"kv_budgett": 32})
