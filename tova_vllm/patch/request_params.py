"""Seam: per-request policy settings are validated where vLLM validates every
request, so a bad value is an HTTP 400 (offline: a ValueError from
``LLM.generate``) that names the field, and no engine process ever sees it.

Wraps ``vllm.v1.engine.input_processor.InputProcessor._validate_params``:
after vLLM's own checks, the request's ``extra_args`` (``vllm_xargs`` in the
OpenAI API) go through `tova_vllm.config.request_settings`. Requests without
``kv_*`` keys pass untouched; unknown ``kv_*`` keys are refused naming the
allowed ones; on an engine without a policy, ``kv_*`` keys are refused (they
would otherwise be ignored silently).

vLLM's extension point for this, a logits processor's ``validate_params``,
was not used: entry-point logits processors load into every engine, stock
ones included, and join their sampling step.

Upstream change that would retire it: a plugin hook for request validation
(see patches/).
"""

from __future__ import annotations

from tova_vllm.patch import _seam

SEAM = "request_params"

_NO_POLICY = object()


def validate_request(processor, params) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from tova_vllm.config import PolicyConfigError, engine_settings_of, request_settings

    if not isinstance(params, SamplingParams):
        return
    engine = getattr(processor, "_tova_engine_settings", _NO_POLICY)
    if engine is _NO_POLICY:
        engine = engine_settings_of(processor.vllm_config)
        processor._tova_engine_settings = engine
    try:
        settings = request_settings(engine, params.extra_args)
    except PolicyConfigError as e:
        field = str(e).split(" ", 1)[0]
        raise VLLMValidationError(str(e), parameter=field) from None
    if settings is not None and settings.policy != engine.policy:
        from tova_vllm.engine_config import tensor_parallel_unsupported_reason

        reason = tensor_parallel_unsupported_reason(processor.vllm_config, type(settings.policy))
        if reason:
            raise VLLMValidationError(f"vllm_xargs.kv_policy: {reason}", parameter="vllm_xargs.kv_policy")


def apply() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    if _seam.is_applied(InputProcessor, "_validate_params"):
        return
    original = _seam.expect_callable(
        InputProcessor, "_validate_params", ["self", "params", "supported_tasks"], SEAM
    )

    def _validate_params(self, params, supported_tasks, *args, **kwargs):
        result = original(self, params, supported_tasks, *args, **kwargs)
        validate_request(self, params)
        return result

    _seam.replace(InputProcessor, "_validate_params", original, _validate_params)
