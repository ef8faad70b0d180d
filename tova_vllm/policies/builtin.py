"""The built-in policies: TOVA and the paper's baselines, plus KeyDiff.
Imported in this order so that listings show TOVA first."""

# ruff: noqa: I001
from tova_vllm.policies.tova import TOVA
from tova_vllm.policies.window import Window
from tova_vllm.policies.sink import Sink
from tova_vllm.policies.h2o import H2O
from tova_vllm.policies.keydiff import KeyDiff

__all__ = ["H2O", "KeyDiff", "Sink", "TOVA", "Window"]
