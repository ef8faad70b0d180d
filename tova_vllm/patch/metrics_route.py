"""Seam: the API server's /metrics shows the eviction policies' counters.
(API process)

Wraps ``vllm.entrypoints.serve.instrumentator.metrics.attach_router``, which
mounts Prometheus' /metrics on the API server's FastAPI app while the app is
built. When the server's arguments set a policy, the wrapper then calls
`tova_vllm.metrics.install`: it registers the tova_vllm:* collector and an
ASGI middleware that, before each /metrics request, fetches the engine core's
counters with vLLM's utility call (``EngineCore.tova_kv_state``). Without a
policy it does nothing.

Why not a stat logger plugin (entry point group ``vllm.stat_logger_plugins``,
vLLM's extension point for metrics): a stat logger only receives
``SchedulerStats``/``IterationStats``, fixed dataclasses whose fields msgspec
encodes (a plugin's engine-side counters cannot ride along), and it gets no
handle on the engine client to ask the engine core for them. Loading one also
switches vLLM's stats on under ``--disable-log-stats``, also without a policy.

Upstream change that would retire it: scrape hooks, async callables that vLLM
awaits with the app's state before serving /metrics (see patches/).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

from tova_vllm.patch import _seam

SEAM = "metrics_route"
TARGET = "vllm.entrypoints.serve.instrumentator.metrics"


def _patch(metrics_module) -> None:
    if _seam.is_applied(metrics_module, "attach_router"):
        return
    original = _seam.expect_callable(metrics_module, "attach_router", ["app"], SEAM)
    if not hasattr(metrics_module, "make_asgi_app"):
        raise _seam.SeamError(
            f"tova-vllm seam '{SEAM}': {TARGET} no longer mounts prometheus_client's "
            f"ASGI app; written for {_seam.SUPPORTED_VLLM_TEXT}."
        )

    def attach_router(app, *args, **kwargs):
        result = original(app, *args, **kwargs)
        from tova_vllm import metrics

        metrics.install(app)
        return result

    _seam.replace(metrics_module, "attach_router", original, attach_router)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the target right after its import. Importing it here instead
    would cost every engine and worker process FastAPI's import (~1 s) for a
    module only the API server uses."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def apply() -> None:
    module = sys.modules.get(TARGET)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
