"""Worker side: the TOVA attention backend, split by job as vLLM's own are.

* `backend`: `TovaAttentionBackend`, its capabilities and KV cache spec;
* `metadata`: the step's dataclasses; `builder`: `TovaMetadataBuilder`, which
  turns the host-side plan (`planning`, a pure function) into device tensors;
* `slots`: the page layout (K, V and a side channel per slot) and the flat
  slot-index arithmetic;
* `prompt`, `decode`, `cuda_decode`: one module per compute path;
* `impl`: `TovaAttentionImpl`, which runs them per layer call.
"""


__all__ = ["BACKEND_NAME", "SUPPORTED_ATTENTION", "TovaAttentionBackend"]


def __getattr__(name: str):
    # Lazy: the scheduler side (tova_vllm.kv_spec) imports `planning` from
    # this package without pulling in the attention backend.
    if name in __all__:
        from tova_vllm.backend import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'tova_vllm.backend' has no attribute {name!r}")
