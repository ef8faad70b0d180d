"""Seam: vLLM's EngineArgs learns the policy settings.

Replaces, on ``vllm.engine.arg_utils.EngineArgs`` (and ``AsyncEngineArgs``):

* ``__init__``: accepts the policy keyword arguments (``kv_policy``,
  ``kv_budget``, ``kv_num_sinks``, ``kv_h2o_recent_ratio``) (so ``LLM(model, kv_policy="tova",
  kv_budget=512)`` works: LLM passes unknown keywords to EngineArgs, whose
  dataclass ``__init__`` would reject them), folds them into
  ``additional_config`` and validates, so bad input fails before any process
  starts.
* ``add_cli_args``: adds ``--kv-policy``, ``--kv-budget``, ``--kv-num-sinks`` and
  ``--kv-h2o-recent-ratio``, with help text, to
  ``vllm serve`` and every CLI that builds engine arguments.
* ``from_cli_args``: folds those flags into ``additional_config``.
* ``create_engine_config``: checks the model is one the policy can handle,
  turns prefix caching off (kept slots depend on attention history, not on the
  token prefix) with one warning, warns once when the budget can never take
  effect, and logs the policy once.

Upstream change that would retire it: a ``kv_policy`` field in vLLM's
CacheConfig, or plugin-declared engine arguments (see patches/).
"""

from __future__ import annotations

import argparse
from typing import Any

from tova_vllm.config import (
    KEY_BUDGET,
    KEY_H2O_RECENT_RATIO,
    KEY_NUM_SINKS,
    KEY_POLICY,
    POLICY_ARG_HELP,
    POLICY_KEYS,
    PolicyConfigError,
    merge_policy_settings,
    policy_from_settings,
)
from tova_vllm.patch import _seam

SEAM = "engine_args"


def _fold(engine_args: Any, settings: dict[str, Any]) -> None:
    merged = merge_policy_settings(_settings_dict(engine_args.additional_config), **settings)
    # Validate now, in the process the user started.
    if policy_from_settings(merged) is not None:
        from tova_vllm.engine_config import pin_v1_model_runner

        pin_v1_model_runner()
    engine_args.additional_config = merged


def _settings_dict(additional_config: Any) -> dict[str, Any]:
    if additional_config is None:
        return {}
    if isinstance(additional_config, dict):
        return additional_config
    raise PolicyConfigError(f"additional_config must be a dict; got {type(additional_config).__name__}")


def _patch_init(cls: type) -> None:
    if "__init__" not in vars(cls) or _seam.is_applied(cls, "__init__"):
        return  # inherits the patched one, or already patched
    original = _seam.expect_callable(cls, "__init__", ["self"], SEAM)

    def __init__(self, *args, **kwargs):
        settings = {key: kwargs.pop(key) for key in POLICY_KEYS if key in kwargs}
        original(self, *args, **kwargs)
        _fold(self, settings)

    _seam.replace(cls, "__init__", original, __init__)


def _patch_add_cli_args(engine_args_cls: type) -> None:
    if _seam.is_applied(engine_args_cls, "add_cli_args"):
        return
    original = _seam.expect_callable(engine_args_cls, "add_cli_args", ["parser"], SEAM)

    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        if any(a.dest == KEY_POLICY for a in parser._actions):
            return parser
        group = parser.add_argument_group(
            title="KV-cache eviction (tova-vllm)",
            description="Cap every sequence's KV cache at a token budget per layer.",
        )
        group.add_argument("--kv-policy", type=str, default=None, help=POLICY_ARG_HELP[KEY_POLICY])
        group.add_argument("--kv-budget", type=int, default=None, help=POLICY_ARG_HELP[KEY_BUDGET])
        group.add_argument("--kv-num-sinks", type=int, default=None, help=POLICY_ARG_HELP[KEY_NUM_SINKS])
        group.add_argument(
            "--kv-h2o-recent-ratio", type=float, default=None, help=POLICY_ARG_HELP[KEY_H2O_RECENT_RATIO]
        )
        return parser

    _seam.replace(engine_args_cls, "add_cli_args", original, add_cli_args, kind="staticmethod")


def _patch_from_cli_args(engine_args_cls: type) -> None:
    if _seam.is_applied(engine_args_cls, "from_cli_args"):
        return
    original = _seam.expect_callable(engine_args_cls, "from_cli_args", ["cls", "args"], SEAM)

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original(cls, args)
        _fold(engine_args, {key: getattr(args, key, None) for key in POLICY_KEYS})
        return engine_args

    _seam.replace(engine_args_cls, "from_cli_args", original, from_cli_args, kind="classmethod")


def _patch_create_engine_config(engine_args_cls: type) -> None:
    if _seam.is_applied(engine_args_cls, "create_engine_config"):
        return
    original = _seam.expect_callable(
        engine_args_cls, "create_engine_config", ["self", "usage_context"], SEAM
    )

    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        from tova_vllm.engine_config import prepare_vllm_config

        prepare_vllm_config(vllm_config)
        return vllm_config

    _seam.replace(engine_args_cls, "create_engine_config", original, create_engine_config)


def apply_init_only() -> bool:
    """The part ``LLM(kv_policy=...)`` needs before general plugins load.
    Returns False while ``vllm.engine.arg_utils`` is still being imported."""
    import sys

    module = sys.modules.get("vllm.engine.arg_utils")
    if module is None or not hasattr(module, "AsyncEngineArgs"):
        return False
    _patch_init(module.EngineArgs)
    _patch_init(module.AsyncEngineArgs)
    return True


def apply() -> None:
    from vllm.engine import arg_utils

    _patch_init(arg_utils.EngineArgs)
    _patch_init(arg_utils.AsyncEngineArgs)
    _patch_add_cli_args(arg_utils.EngineArgs)
    _patch_from_cli_args(arg_utils.EngineArgs)
    _patch_create_engine_config(arg_utils.EngineArgs)
