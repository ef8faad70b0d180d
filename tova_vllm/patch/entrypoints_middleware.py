"""Seam: the request check (`tova_vllm.request_check`) runs behind vLLM's
authentication and every other middleware. (API process)

Wraps ``vllm.entrypoints.serve.middleware.register.init_entrypoints_middleware``,
which ``build_app`` calls once the routes exist to add the server's middleware:
CORS, the API-key check (``--api-key`` / ``VLLM_API_KEY``), request ids, the
elastic-EP scaling guard, response logging and the user's ``--middleware``.
``vllm.entrypoints.launchers.app`` imports the name, so its binding is
pointed at the wrapper too. When the server's arguments set a policy, the
wrapper appends `KVSettingsCheck` to the end of the app's middleware list
once vLLM is done: Starlette runs that list first to last, so the check runs
last, right in front of the routes, whatever else the user adds. A request
that any middleware refuses (a 401 for a missing or wrong key) never reaches
it. Without a policy it adds nothing. It also drops the check from
``--middleware`` if a user names it there (it would run before
authentication).

Why not vLLM's extension points: ``--middleware`` entries are added last, so
they run first, before authentication (the plugin used it until issue 26:
a client without a key got the plugin's 400 and learnt the server's settings
from it). Endpoint plugins (``vllm.endpoint_plugins``) are attached before the
middleware, but load only when named in ``VLLM_PLUGINS``, which also filters
general plugins. Doing the raw-JSON check inside the engine's request
validation instead (`request_params`) would run after authentication but
without the raw JSON, and for streaming requests after the HTTP 200 has gone.

Checked in vLLM 0.32.0 (installed), 0.33.0 and 0.34.0 (source): the same
``init_entrypoints_middleware(args, app, supported_tasks)``, imported by name
into ``launchers/app.py`` and called from ``build_app``.

Upstream change that would retire it: ``register_route_middleware``, plugin
middleware that vLLM appends after its own and the user's, so it runs after
authentication (see patches/).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

from vllm.logger import init_logger

from tova_vllm.patch import _seam

logger = init_logger(f"vllm.{__name__}")

SEAM = "entrypoints_middleware"
TARGET = "vllm.entrypoints.serve.middleware.register"
# Imports the target's function by name and calls it from build_app.
BUILDER = "vllm.entrypoints.launchers.app"
FUNCTION = "init_entrypoints_middleware"


def _add_request_check(args, app) -> None:
    from starlette.middleware import Middleware

    from tova_vllm.metrics import settings_from_cli_args
    from tova_vllm.request_check import KVSettingsCheck

    engine = settings_from_cli_args(args)
    if engine is None:
        return
    if getattr(app, "middleware_stack", None) is not None or not isinstance(getattr(app, "user_middleware", None), list):
        raise _seam.SeamError(
            f"tova-vllm seam '{SEAM}': the API server's app is already running or has no "
            f"Starlette middleware list when {FUNCTION} returns; written for {_seam.SUPPORTED_VLLM_TEXT}."
        )
    # Last in the list = innermost: after authentication and every --middleware.
    app.user_middleware.append(Middleware(KVSettingsCheck, engine=engine))
    logger.debug("tova-vllm: request check added after the server's middleware")


def _drop_from_user_middleware(args) -> None:
    """A user naming the check in --middleware would run it before
    authentication; it is added after it anyway."""
    from tova_vllm.request_check import MIDDLEWARE

    listed = getattr(args, "middleware", None)
    if isinstance(listed, list) and MIDDLEWARE in listed:
        logger.warning(
            "tova-vllm: %s is dropped from --middleware: the plugin adds it after vLLM's "
            "authentication itself (as a --middleware it would read requests before it)",
            MIDDLEWARE,
        )
        args.middleware = [m for m in listed if m != MIDDLEWARE]


def _patch(module) -> None:
    if _seam.is_applied(module, FUNCTION):
        return
    original = _seam.expect_callable(module, FUNCTION, ["args", "app"], SEAM)

    def init_entrypoints_middleware(args, app, *more, **kwargs):
        _drop_from_user_middleware(args)
        result = original(args, app, *more, **kwargs)
        _add_request_check(args, app)
        return result

    _seam.replace(module, FUNCTION, original, init_entrypoints_middleware)


def _rebind(builder) -> None:
    """``build_app`` calls the name its module imported: point it at the
    wrapper (its module may have been imported before the seam applied)."""
    wrapper = getattr(sys.modules[TARGET], FUNCTION)
    bound = getattr(builder, FUNCTION, None)
    if bound is wrapper:
        return
    if bound is not getattr(wrapper, "__tova_vllm_original__", None):
        raise _seam.SeamError(
            f"tova-vllm seam '{SEAM}': {BUILDER}.{FUNCTION} is not vLLM's "
            f"{TARGET}.{FUNCTION}; written for {_seam.SUPPORTED_VLLM_TEXT}."
        )
    setattr(builder, FUNCTION, wrapper)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the target right after its import, before ``build_app``'s
    module takes the name. Importing it here instead would cost every engine
    and worker process FastAPI's import for a module only the API server uses."""

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
    if module is None:
        if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _PatchOnImport())
        return
    _patch(module)
    if BUILDER in sys.modules:
        _rebind(sys.modules[BUILDER])


def ensure_applied() -> None:
    """For ``vllm serve`` with a policy (called while its arguments become
    engine arguments): the seam is in place where ``build_app`` looks, or a
    `SeamError` now, rather than a server whose check silently is missing."""
    try:
        builder = importlib.import_module(BUILDER)
    except ImportError as e:
        raise _seam.SeamError(
            f"tova-vllm seam '{SEAM}': cannot import {BUILDER} ({e}); written for {_seam.SUPPORTED_VLLM_TEXT}."
        ) from None
    apply()
    if not _seam.is_applied(builder, FUNCTION):
        raise _seam.SeamError(
            f"tova-vllm seam '{SEAM}': {BUILDER}.{FUNCTION} is not patched; "
            f"written for {_seam.SUPPORTED_VLLM_TEXT}."
        )
