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

It also wraps ``InputProcessor.process_inputs``, where the prompt's length
is known: a request whose blocks could never fit the KV cache at once (a
bulk prompt holds all its tokens while it is prefilled) is refused, naming
``kv_prompt_mode='chunked'`` as the way out, instead of waiting for ever.

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


def check_fits(processor, request) -> None:
    """Refuse a request that could never be scheduled: its peak blocks
    (`planning.peak_blocks`) exceed the KV cache's (known once the engine has
    started)."""
    from vllm.exceptions import VLLMValidationError

    from tova_vllm.backend import planning
    from tova_vllm.config import request_settings

    params = getattr(request, "sampling_params", None)
    engine = getattr(processor, "_tova_engine_settings", None)
    cache = processor.vllm_config.cache_config
    if params is None or engine is None or not cache.num_gpu_blocks:
        return
    dp = max(processor.vllm_config.parallel_config.data_parallel_size, 1)
    usable = cache.num_gpu_blocks // dp - 1  # vLLM's null block is never handed out
    settings = request_settings(engine, params.extra_args)
    prompt_len = len(request.prompt_token_ids or ()) or int(getattr(request, "num_prompt_tokens", 0) or 0)
    mode = planning.MODE_CODES[settings.prompt_mode]
    region = planning.prompt_region_blocks(
        prompt_len, cache.block_size, mode, settings.policy.prefix_cacheable, bool(cache.enable_prefix_caching)
    )
    need = planning.peak_blocks(
        prompt_len, params.max_tokens or 1, settings.budget, mode, settings.chunk, region, cache.block_size
    )
    if need > usable:
        raise VLLMValidationError(
            f"the request needs {need} KV blocks of {cache.block_size} tokens at once (a "
            f"{prompt_len}-token prompt, kv_prompt_mode={settings.prompt_mode!r}"
            f"{', with its prefix-cache region' if region else ''}) but the KV cache holds {usable}; "
            f"use vllm_xargs.kv_prompt_mode='chunked' (at most kv_budget + kv_prompt_chunk slots "
            "while the prompt is processed), a shorter prompt, or a larger KV cache",
            parameter="prompt",
        )


def apply() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    if _seam.is_applied(InputProcessor, "_validate_params"):
        return
    original = _seam.expect_callable(
        InputProcessor, "_validate_params", ["self", "params", "supported_tasks"], SEAM
    )
    process = _seam.expect_callable(InputProcessor, "process_inputs", ["self", "request_id", "prompt", "params"], SEAM)

    def _validate_params(self, params, supported_tasks, *args, **kwargs):
        result = original(self, params, supported_tasks, *args, **kwargs)
        validate_request(self, params)
        return result

    def process_inputs(self, *args, **kwargs):
        request = process(self, *args, **kwargs)
        check_fits(self, request)
        return request

    _seam.replace(InputProcessor, "_validate_params", original, _validate_params)
    _seam.replace(InputProcessor, "process_inputs", process, process_inputs)
