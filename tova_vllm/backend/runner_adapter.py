"""What the metadata builder needs of vLLM's model runner, one adapter per runner.

``CommonAttentionMetadata`` says where each batch row's tokens are, not which
request they belong to. The builder also needs, per row, the request's prompt
length (the bulk reduction happens at the prompt's end, also when a preempted
request recomputes prompt and output in one chunk) and its own KV settings
(``SamplingParams.extra_args``). Each model runner keeps these its own way:

* Model Runner V1 (``vllm.v1.worker.gpu_model_runner``, vLLM <= 0.33): the
  persistent input batch holds the rows' request ids in batch order and their
  prompt lengths; ``runner.requests`` holds their sampling params.
* Model Runner V2 (``vllm.v1.worker.gpu.model_runner``, the only one from
  0.34): rows point into the runner's request table through
  ``CommonAttentionMetadata.req_idx``; the table holds request ids and prompt
  lengths. It keeps no sampling params on every pipeline rank (only the last
  rank's sampler sees them), so the seam tells the adapter each new request's
  settings, and whether the step is a dummy run (profiling, warm-up, CUDA-graph
  capture: rows that belong to no request, whose K/V must not be written).

The seam (`tova_vllm.patch.model_runner`) makes the adapter and binds it to
the builders; nothing else in the backend knows which runner runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class BatchRequests:
    """The requests of a step's rows, in batch order."""

    req_ids: Sequence[str]
    prompt_lens: np.ndarray  # [n] int64
    extra_args: list[dict[str, Any] | None]  # each request's SamplingParams.extra_args


@dataclass(frozen=True)
class RequestState:
    """One running request as the runner holds it (for inspection)."""

    prompt_len: int
    computed_tokens: int  # tokens whose K/V are in the cache
    extra_args: dict[str, Any] | None
    block_row: torch.Tensor  # its row of the first KV cache group's block table


def _extra_args(sampling_params) -> dict[str, Any] | None:
    return None if sampling_params is None else sampling_params.extra_args


class RunnerAdapter:
    """The interface; `V1RunnerAdapter` and `V2RunnerAdapter` implement it."""

    name: str

    def batch(self, cm) -> BatchRequests | None:
        """The requests of the ``CommonAttentionMetadata``'s rows, or None
        for a dummy batch (its rows belong to no request)."""
        raise NotImplementedError

    def live_request_ids(self) -> list[str]:
        """Every request the runner, or this adapter, holds state for."""
        raise NotImplementedError

    def request(self, req_id: str) -> RequestState | None:
        raise NotImplementedError


class V1RunnerAdapter(RunnerAdapter):
    name = "V1"

    def __init__(self, runner) -> None:
        self.runner = runner

    def batch(self, cm) -> BatchRequests:
        n = cm.num_reqs
        batch = self.runner.input_batch
        req_ids = batch.req_ids[:n]
        return BatchRequests(
            req_ids=req_ids,
            prompt_lens=batch.num_prompt_tokens_cpu_tensor[:n].numpy().astype(np.int64),
            extra_args=[_extra_args(self.runner.requests[r].sampling_params) for r in req_ids],
        )

    def live_request_ids(self) -> list[str]:
        batch = self.runner.input_batch
        return sorted(set(self.runner.requests) | {r for r in batch.req_ids if r is not None})

    def request(self, req_id: str) -> RequestState | None:
        state = self.runner.requests.get(req_id)
        batch = self.runner.input_batch
        if state is None or req_id not in batch.req_id_to_index:
            return None
        row = batch.req_id_to_index[req_id]
        table = batch.block_table.block_tables[0].block_table.np[row].copy()
        out = state.output_token_ids
        return RequestState(
            prompt_len=state.num_prompt_tokens,
            # The runner updates num_computed_tokens when the next step is
            # scheduled; the last sampled token's K/V come with that step.
            computed_tokens=state.num_prompt_tokens + len(out) - 1 if out else state.num_computed_tokens,
            extra_args=_extra_args(state.sampling_params),
            block_row=torch.from_numpy(table),
        )


class V2RunnerAdapter(RunnerAdapter):
    name = "V2"

    def __init__(self, runner) -> None:
        self.runner = runner
        self.states = runner.req_states
        # The prompt lengths by request index: a host copy on the GPU runner
        # (UvaBackedTensor.np), a NumPy view on vLLM 0.34's standalone CPU runner.
        self._prompt_lens = self.states.prompt_len_np if hasattr(self.states, "prompt_len_np") else self.states.prompt_len.np
        self._extra: dict[str, dict[str, Any] | None] = {}
        self._dummy = False

    def begin_step(self, new_requests: Iterable, finished: Iterable[str], dummy: bool) -> None:
        """Told by the seam before each ``execute_model``: the step's new (or
        resumed) requests, those that left, and whether it is a dummy run."""
        self._dummy = dummy
        if dummy:
            return
        for req_id in finished:
            self._extra.pop(req_id, None)
        for new in new_requests:
            self._extra[new.req_id] = _extra_args(new.sampling_params)

    def batch(self, cm) -> BatchRequests | None:
        if self._dummy:
            return None
        n = cm.num_reqs
        idx = np.asarray(cm.req_idx[:n])
        req_ids = [self.states.index_to_req_id[int(i)] for i in idx]
        return BatchRequests(
            req_ids=req_ids,
            prompt_lens=self._prompt_lens[idx].astype(np.int64),
            extra_args=[self._settings_of(r) for r in req_ids],
        )

    def _settings_of(self, req_id: str) -> dict[str, Any] | None:
        try:
            return self._extra[req_id]
        except KeyError:
            raise RuntimeError(
                f"tova-vllm: request {req_id} runs in Model Runner V2 but the model-runner seam "
                "never saw it arrive (tova_vllm.patch.model_runner); internal error"
            ) from None

    def live_request_ids(self) -> list[str]:
        return sorted(set(self.states.req_id_to_index) | set(self._extra))

    def request(self, req_id: str) -> RequestState | None:
        idx = self.states.req_id_to_index.get(req_id)
        if idx is None:
            return None
        computed = self.states.num_computed_tokens
        computed = computed.gpu if hasattr(computed, "gpu") else computed  # GPU runner / standalone CPU runner
        tables = self.runner.block_tables
        table = tables.block_tables[0]
        row = table.gpu[idx] if hasattr(table, "gpu") else table[idx]
        return RequestState(
            prompt_len=int(self._prompt_lens[idx]),
            computed_tokens=int(computed[idx]),
            extra_args=self._extra.get(req_id),
            block_row=row.clone(),
        )
