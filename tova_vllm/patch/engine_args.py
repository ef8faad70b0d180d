"""Seam: vLLM's EngineArgs learns the policy settings.

Replaces, on ``vllm.engine.arg_utils.EngineArgs`` (and ``AsyncEngineArgs``):

* ``__init__``: accepts the KV settings as keyword arguments (``kv_policy``,
  ``kv_budget``, ``kv_prompt_mode``, ... and every registered policy's options;
  any ``kv_*`` keyword, so a misspelt one gets an error naming the allowed
  keys) (so ``LLM(model, kv_policy="tova", kv_budget=512)`` works: LLM passes
  unknown keywords to EngineArgs, whose dataclass ``__init__`` would reject
  them), folds them into ``additional_config`` and validates, so bad input
  fails before any process starts.
* ``add_cli_args``: adds ``--kv-policy``, ``--kv-budget``, ``--kv-prompt-mode``,
  ``--kv-prompt-chunk`` and one flag per policy option (from the policy
  registry), with help text, to ``vllm serve`` and every CLI that builds
  engine arguments.
* ``from_cli_args``: folds those flags into ``additional_config``; with a
  policy, for ``vllm serve``, makes sure the seam that adds tova-vllm's request
  check (`tova_vllm.request_check`, the raw JSON's ``vllm_xargs``) behind
  vLLM's authentication is in place (`tova_vllm.patch.entrypoints_middleware`).
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
    KEY_POLICY,
    PolicyConfigError,
    cli_settings,
    engine_settings,
    merge_settings,
    settings_keys,
)
from tova_vllm.patch import _seam

SEAM = "engine_args"


def _fold(engine_args: Any, settings: dict[str, Any]) -> None:
    merged = merge_settings(_settings_dict(engine_args.additional_config), **settings)
    engine_settings(merged)  # validate now, in the process the user started
    engine_args.additional_config = merged


def _settings_dict(additional_config: Any) -> dict[str, Any]:
    if additional_config is None:
        return {}
    if isinstance(additional_config, dict):
        return additional_config
    raise PolicyConfigError(f"additional_config must be a dict; got {type(additional_config).__name__}")


def _own_fields(cls: type) -> frozenset[str]:
    """EngineArgs' own fields (vLLM has kv_cache_dtype, kv_transfer_config, ...)."""
    import dataclasses

    return frozenset(f.name for f in dataclasses.fields(cls))


def _patch_init(cls: type) -> None:
    if "__init__" not in vars(cls) or _seam.is_applied(cls, "__init__"):
        return  # inherits the patched one, or already patched
    original = _seam.expect_callable(cls, "__init__", ["self"], SEAM)

    def __init__(self, *args, **kwargs):
        own = _own_fields(type(self))
        settings = {key: kwargs.pop(key) for key in list(kwargs) if key.startswith("kv_") and key not in own}
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
        for flag, dest, typ, help_text in cli_settings():
            group.add_argument(flag, dest=dest, type=typ, default=None, help=help_text)
        return parser

    _seam.replace(engine_args_cls, "add_cli_args", original, add_cli_args, kind="staticmethod")


def _require_request_check(args: argparse.Namespace) -> None:
    """The server's arguments (``vllm serve`` has ``--middleware``): its
    raw-JSON check of per-request settings is added behind vLLM's
    authentication by the ``entrypoints_middleware`` seam, which must be in
    place; other CLIs build no API server."""
    if isinstance(getattr(args, "middleware", None), list):
        from tova_vllm.patch import entrypoints_middleware

        entrypoints_middleware.ensure_applied()


def _patch_from_cli_args(engine_args_cls: type) -> None:
    if _seam.is_applied(engine_args_cls, "from_cli_args"):
        return
    original = _seam.expect_callable(engine_args_cls, "from_cli_args", ["cls", "args"], SEAM)

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original(cls, args)
        _fold(engine_args, {key: getattr(args, key, None) for key in settings_keys()})
        if engine_settings(engine_args.additional_config) is not None:
            _require_request_check(args)
        return engine_args

    _seam.replace(engine_args_cls, "from_cli_args", original, from_cli_args, kind="classmethod")


def _patch_create_engine_config(engine_args_cls: type) -> None:
    if _seam.is_applied(engine_args_cls, "create_engine_config"):
        return
    original = _seam.expect_callable(
        engine_args_cls, "create_engine_config", ["self", "usage_context"], SEAM
    )

    def create_engine_config(self, *args, **kwargs):
        from tova_vllm.engine_config import prepare_vllm_config, requested_cudagraph_mode

        # Before the platform resolves it (the CPU platform resets it to NONE).
        requested = requested_cudagraph_mode(getattr(self, "compilation_config", None))
        vllm_config = original(self, *args, **kwargs)
        prepare_vllm_config(vllm_config, requested)
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
