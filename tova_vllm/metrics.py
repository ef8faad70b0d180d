"""Prometheus metrics of the KV eviction policies, on the API server's /metrics.

The counters live in the engine core (`tova_vllm.kv_spec.PolicyStats`, per
policy, counted when a request finishes or is aborted). Just before each
/metrics request the API server fetches them with vLLM's utility call
(``EngineCore.tova_kv_state``, `tova_vllm.patch.engine_core`) and this
module's collector exposes that snapshot (`tova_vllm.patch.metrics_route`
wires it in). Fetching at scrape time keeps the numbers current without a
background task, and costs nothing while nobody scrapes.

Names and labels follow vLLM's own metrics (``vllm:...{model_name, engine}``):

* ``tova_vllm:requests_total{policy}``: requests served with the policy;
* ``tova_vllm:tokens_evicted_total{policy}``: tokens those requests dropped
  from their KV cache (per layer; every layer drops as many);
* ``tova_vllm:kv_blocks_held_total{policy}`` and
  ``tova_vllm:kv_blocks_without_eviction_total{policy}``: KV blocks the
  requests held when they finished vs the blocks the same requests would have
  held without eviction (the ratio is the memory saved);
* gauges ``tova_vllm:kv_cache_free_blocks``, ``tova_vllm:kv_cache_blocks`` and
  ``tova_vllm:kv_cache_requests`` (requests holding KV blocks now).

Without a policy none of this is registered (the seam does nothing).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from vllm.logger import init_logger

from tova_vllm.config import KVSettings, engine_settings, merge_settings, settings_keys
from tova_vllm.patch.engine_core import METHOD as KV_STATE_METHOD
from tova_vllm.policies import policy_names

logger = init_logger(f"vllm.{__name__}")

PREFIX = "tova_vllm:"
# A scrape waits at most this long for the engine core (it answers between
# two steps); after that it serves the last snapshot.
FETCH_TIMEOUT_S = 10.0

# (metric name without _total, PolicyStats field, help)
POLICY_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("requests", "requests", "Requests served with this KV eviction policy (counted when they finish or are aborted)."),
    (
        "tokens_evicted",
        "tokens_evicted",
        "Tokens evicted from the KV cache by this policy, per layer (each layer evicts as many), summed over requests.",
    ),
    ("kv_blocks_held", "blocks_held", "KV cache blocks the requests of this policy held when they finished."),
    (
        "kv_blocks_without_eviction",
        "blocks_without_eviction",
        "KV cache blocks the same requests would have held without eviction (one slot per token).",
    ),
)
# (metric name, tova_kv_state key or callable, help)
ENGINE_GAUGES: tuple[tuple[str, Any, str], ...] = (
    ("kv_cache_free_blocks", "num_free_blocks", "Free KV cache blocks in the engine's block pool."),
    ("kv_cache_blocks", "num_blocks", "KV cache blocks in the engine's block pool."),
    (
        "kv_cache_requests",
        lambda state: len(state.get("blocks_per_running_request", {})),
        "Requests the KV cache managers hold blocks for.",
    ),
)
LABELS = ("model_name", "engine")


def settings_from_cli_args(args: Any) -> KVSettings | None:
    """The server's settings from ``vllm serve``'s parsed arguments (the CLI
    flags and ``--additional-config``), or None."""
    additional = getattr(args, "additional_config", None)
    settings = merge_settings(
        additional if isinstance(additional, dict) else None,
        **{key: getattr(args, key, None) for key in settings_keys()},
    )
    return engine_settings(settings)


class TovaCollector:
    """A Prometheus collector over the last fetched ``tova_kv_state`` of each
    engine (the counters are cumulative in the engine core, so they are
    exposed as they are: a counter proxied from another process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model_name = ""
        # engine label -> tova_kv_state
        self._states: dict[str, dict[str, Any]] = {}

    def update(self, model_name: str, states: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            self._model_name = model_name
            self._states = dict(states)

    def describe(self) -> Iterator[Any]:
        return self._families({}, "")

    def collect(self) -> Iterator[Any]:
        with self._lock:
            states, model_name = dict(self._states), self._model_name
        return self._families(states, model_name)

    @staticmethod
    def _families(states: dict[str, dict[str, Any]], model_name: str) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, field, doc in POLICY_COUNTERS:
            family = CounterMetricFamily(PREFIX + name, doc, labels=("policy", *LABELS))
            for engine, state in sorted(states.items()):
                stats = state.get("stats", {})
                # Every registered policy has its series (0 until it serves).
                for policy in (*policy_names(), *sorted(set(stats) - set(policy_names()))):
                    family.add_metric((policy, model_name, engine), stats.get(policy, {}).get(field, 0))
            yield family
        for name, source, doc in ENGINE_GAUGES:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
            for engine, state in sorted(states.items()):
                value = source(state) if callable(source) else state.get(source)
                if value is not None:
                    family.add_metric((model_name, engine), value)
            yield family


_collector: TovaCollector | None = None
_collector_lock = threading.Lock()


def collector() -> TovaCollector:
    """The process's collector, registered with vLLM's Prometheus registry
    on first use (once: registering the same names twice fails)."""
    global _collector
    with _collector_lock:
        if _collector is None:
            from vllm.v1.metrics.prometheus import get_prometheus_registry

            registry = get_prometheus_registry()
            from prometheus_client import REGISTRY

            if registry is not REGISTRY:
                # Several API server processes (PROMETHEUS_MULTIPROC_DIR): vLLM
                # serves only multiprocess-file metrics then.
                logger.warning(
                    "tova-vllm: with several API server processes the tova_vllm:* "
                    "metrics are not exported on /metrics (use --api-server-count 1)."
                )
            _collector = TovaCollector()
            REGISTRY.register(_collector)
        return _collector


async def fetch_states(engine_client: Any) -> dict[str, dict[str, Any]]:
    """``tova_kv_state`` of every engine the client manages, by engine label."""
    core = engine_client.engine_core
    call_all = getattr(core, "call_utility_all_async", None)
    if call_all is not None:
        results = await call_all(KV_STATE_METHOD)
        ranks: Iterable[Any] = getattr(core, "engine_ranks_managed", None) or range(len(results))
    else:
        results, ranks = [await core.call_utility_async(KV_STATE_METHOD)], [0]
    return {str(rank): state for rank, state in zip(ranks, results)}


_failing = False


async def refresh(app_state: Any) -> None:
    """Fetch the engine core's counters into the collector. On failure (the
    engine is busy past the timeout, or gone) the last snapshot stays."""
    global _failing
    engine_client = getattr(app_state, "engine_client", None)
    vllm_config = getattr(app_state, "vllm_config", None)
    if engine_client is None or vllm_config is None:
        return
    try:
        states = await asyncio.wait_for(fetch_states(engine_client), FETCH_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 (a scrape must still answer)
        if not _failing:
            logger.warning("tova-vllm: could not read the engine's KV eviction counters: %r", e)
        _failing = True
        return
    _failing = False
    collector().update(vllm_config.model_config.served_model_name, states)


class RefreshBeforeScrape:
    """ASGI middleware: before a /metrics request, refresh the collector."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if scope["type"] == "http" and path.rstrip("/") == "/metrics":
            app = scope.get("app")
            if app is not None:
                await refresh(app.state)
        await self.app(scope, receive, send)


def install(app: Any) -> bool:
    """Expose the metrics on ``app`` (vLLM's FastAPI app, before it starts)
    when its arguments set a policy. Returns whether it did."""
    settings = settings_from_cli_args(getattr(app.state, "args", None))
    if settings is None:
        return False
    collector()
    app.add_middleware(RefreshBeforeScrape)
    logger.info("tova-vllm: /metrics exports tova_vllm:* KV eviction metrics per policy.")
    return True
