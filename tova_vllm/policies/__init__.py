"""KV eviction policies: one small file each, registered by name.

* `base`: `EvictionPolicy` (a frozen dataclass: name, options, capabilities,
  one keep-priority function), `option`, the `Candidates` view.
* `selection`: the one sign convention, tie rule and masks.
* `registry`: `register_policy`, the ``tova_vllm.policies`` entry-point group.
* `tova`, `window`, `sink`, `h2o`, `keydiff`: the built-in policies.

The same policy objects run in the vLLM backend (`tova_vllm.backend`) and in
the transformers reference (`tova_vllm.reference`).
"""

from tova_vllm.policies import selection
from tova_vllm.policies.base import Candidates, EvictionPolicy, Option, PolicyOptionError, option
from tova_vllm.policies.registry import (
    ENTRY_POINT_GROUP,
    load_plugins,
    option_keys,
    policy_class,
    policy_classes,
    policy_names,
    register_policy,
)

# ruff: noqa: I001, E402  (after the registry: the built-in policies register themselves)
from tova_vllm.policies.builtin import H2O, KeyDiff, Sink, TOVA, Window

__all__ = [
    "ENTRY_POINT_GROUP",
    "H2O",
    "TOVA",
    "Candidates",
    "EvictionPolicy",
    "KeyDiff",
    "Option",
    "PolicyOptionError",
    "Sink",
    "Window",
    "load_plugins",
    "option",
    "option_keys",
    "policy_class",
    "policy_classes",
    "policy_names",
    "register_policy",
    "selection",
]
