"""The policy registry: every place that lists or validates policies reads it.

Policies register with the `register_policy` decorator. This package's own
(`tova`, `window`, `sink`, `h2o`, `keydiff`) register on import; other
packages add theirs through the entry-point group ``tova_vllm.policies``
(each entry point names a module, or a policy class, to import), which
`load_plugins` loads -- in every vLLM process, since the plugin's
``vllm.general_plugins`` hook and every lookup here call it::

    [project.entry-points."tova_vllm.policies"]
    knorm = "tova_knorm:KNorm"
"""

from __future__ import annotations

import threading
from importlib.metadata import entry_points

from tova_vllm.policies.base import EvictionPolicy

ENTRY_POINT_GROUP = "tova_vllm.policies"

# The settings every policy has (`tova_vllm.config`); no option may take them.
KEY_POLICY = "kv_policy"
KEY_BUDGET = "kv_budget"
KEY_PROMPT_MODE = "kv_prompt_mode"
KEY_PROMPT_CHUNK = "kv_prompt_chunk"
GENERAL_KEYS: tuple[str, ...] = (KEY_POLICY, KEY_BUDGET, KEY_PROMPT_MODE, KEY_PROMPT_CHUNK)

_REGISTRY: dict[str, type[EvictionPolicy]] = {}
_OPTION_KEYS: dict[str, str] = {}  # option key -> policy name
_lock = threading.RLock()
_plugins_loaded = False


def register_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    """Class decorator: make ``cls`` available as ``kv_policy=cls.name``.
    Idempotent for the same class; a different class under a taken name or
    option key is an error."""
    if not (isinstance(cls, type) and issubclass(cls, EvictionPolicy)):
        raise TypeError(f"register_policy expects an EvictionPolicy subclass; got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower() or name == "none":
        raise TypeError(f"{cls.__name__}.name must be a lower-case identifier other than 'none'; got {name!r}")
    with _lock:
        existing = _REGISTRY.get(name)
        if existing is not None:
            if _same_class(existing, cls):
                return existing
            raise ValueError(f"kv_policy {name!r} is registered twice: {_path(existing)} and {_path(cls)}")
        options = cls.options()  # validates the declaration
        keys = [opt.key for opt in options]
        for opt in options:
            owner = _OPTION_KEYS.get(opt.key)
            if owner is not None:
                raise ValueError(f"option key {opt.key!r} of policy {name!r} is already used by policy {owner!r}")
            if opt.key in GENERAL_KEYS:
                raise ValueError(f"option key {opt.key!r} of policy {name!r} is a general setting ({', '.join(GENERAL_KEYS)})")
            if keys.count(opt.key) > 1:
                raise ValueError(f"option key {opt.key!r} is declared twice by policy {name!r}")
        if cls.cuda_fast_path and (cls.per_kv_head or not cls.reads_attention or cls.accumulates):
            raise TypeError(f"{cls.__name__}: the CUDA fast path implements TOVA-like policies only")
        _REGISTRY[name] = cls
        for opt in options:
            _OPTION_KEYS[opt.key] = name
    return cls


def _same_class(a: type, b: type) -> bool:
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def load_plugins() -> None:
    """Import this package's policies and every ``tova_vllm.policies`` entry
    point, once per process. A broken plugin fails loudly, naming it."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    with _lock:
        if _plugins_loaded:
            return
        import tova_vllm.policies.builtin  # noqa: F401  (registers the built-in policies)

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = ep.load()
            except Exception as e:
                raise RuntimeError(
                    f"tova-vllm: the eviction-policy plugin {ep.name!r} ({ep.value}) failed to load: {e}"
                ) from e
            if isinstance(loaded, type) and issubclass(loaded, EvictionPolicy):
                register_policy(loaded)
        _plugins_loaded = True


def policy_names() -> tuple[str, ...]:
    """Registered policy names, built-in ones first."""
    load_plugins()
    return tuple(_REGISTRY)


def policy_class(name: str) -> type[EvictionPolicy]:
    load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(name) from None


def policy_classes() -> tuple[type[EvictionPolicy], ...]:
    load_plugins()
    return tuple(_REGISTRY.values())


def option_keys() -> dict[str, str]:
    """Every policy option key -> the policy that declares it."""
    load_plugins()
    return dict(_OPTION_KEYS)
