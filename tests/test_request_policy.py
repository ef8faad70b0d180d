"""Per-request settings (SamplingParams.extra_args / vllm_xargs): what a
request may choose, and the errors naming the field and its allowed values."""

from __future__ import annotations

import pytest

from tova_vllm.config import PolicyConfigError, RequestPolicy, request_policy
from tova_vllm.policies import PolicyConfig

ENGINE = PolicyConfig("tova", 64)


def test_no_settings_is_the_engine_policy():
    assert request_policy(ENGINE, None) == RequestPolicy(ENGINE)
    assert request_policy(ENGINE, {"other_plugin_key": 1}) == RequestPolicy(ENGINE)
    assert request_policy(None, None) is None
    assert request_policy(None, {"unrelated": True}) is None


def test_a_request_picks_its_policy_budget_options_and_prompt_mode():
    rp = request_policy(ENGINE, {"kv_policy": "sink", "kv_budget": 16, "kv_num_sinks": 2})
    assert rp == RequestPolicy(PolicyConfig("sink", 16, num_sinks=2))
    rp = request_policy(ENGINE, {"kv_policy": "H2O", "kv_h2o_recent_ratio": 0.25, "kv_prompt_mode": "stream"})
    assert rp.policy == PolicyConfig("h2o", 64, h2o_recent_ratio=0.25) and rp.stream_prompt
    # The engine's sink count follows its policy; clipped below a small budget.
    engine_sink = PolicyConfig("sink", 64, num_sinks=8)
    assert request_policy(engine_sink, {"kv_budget": 5}).policy == PolicyConfig("sink", 5, num_sinks=4)


@pytest.mark.parametrize(
    "extra,field,allowed",
    [
        ({"kv_budget": 65}, "kv_budget", "[1, 64]"),
        ({"kv_budget": 0}, "kv_budget", "[1, 64]"),
        ({"kv_budget": "12"}, "kv_budget", "[1, 64]"),
        ({"kv_budget": True}, "kv_budget", "[1, 64]"),
        ({"kv_policy": "lru"}, "kv_policy", "tova, window, sink, h2o"),
        ({"kv_policy": "sink", "kv_budget": 4, "kv_num_sinks": 4}, "kv_num_sinks", "[0, 3]"),
        ({"kv_num_sinks": 2}, "kv_num_sinks", "kv_policy='sink' only"),
        ({"kv_policy": "h2o", "kv_h2o_recent_ratio": 0}, "kv_h2o_recent_ratio", "(0, 1)"),
        ({"kv_h2o_recent_ratio": 0.5}, "kv_h2o_recent_ratio", "kv_policy='h2o' only"),
        ({"kv_prompt_mode": "eager"}, "kv_prompt_mode", "bulk, stream"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(extra, field, allowed):
    with pytest.raises(PolicyConfigError) as info:
        request_policy(ENGINE, extra)
    message = str(info.value)
    assert message.startswith(f"vllm_xargs.{field} ") and allowed in message, message


def test_settings_on_an_engine_without_a_policy_are_refused():
    with pytest.raises(PolicyConfigError, match=r"vllm_xargs\.kv_budget needs a server started with"):
        request_policy(None, {"kv_budget": 32})
