"""Workload presets. Sequences are ``seq_len`` tokens (``prompt_len`` prompt +
the rest output, EOS ignored); budgets are TOVA's per-sequence token budgets.
The KV cache has the same memory for every engine: enough for
``stock_full_seqs`` full sequences (the paper's shape: stock vLLM fits only a
few, while a budget of 1/8 of the sequence fits about 8x more).

A preset measures one or more TOVA *variants* per budget (``variants``): how
prompts are processed (``kv_prompt_mode`` ``bulk``, ``chunked`` with
``kv_prompt_chunk``, or ``stream``), each on its own engine beside the same
stock runs."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

LLAMA2_7B_SHAPE = "llama-2-7b-shape"
PROMPT_MODES = ("bulk", "chunked", "stream")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run TOVA beside stock: its prompt mode (and chunk)."""

    prompt_mode: str = "bulk"
    prompt_chunk: int | None = None  # chunked only; None: the budget

    def __post_init__(self):
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt mode must be one of {', '.join(PROMPT_MODES)}; got {self.prompt_mode!r}")
        if self.prompt_chunk is not None and (self.prompt_mode != "chunked" or self.prompt_chunk < 1):
            raise ValueError("a prompt chunk (a positive integer) goes with the chunked prompt mode only")

    @property
    def name(self) -> str:
        """'bulk', 'chunked', 'chunked64', 'stream' (JSON key, file names)."""
        return self.prompt_mode + (str(self.prompt_chunk) if self.prompt_chunk else "")

    @property
    def label(self) -> str:
        """'bulk', 'chunked/64' (chunks of 64 tokens), 'stream' (tables, plots)."""
        return self.prompt_mode + (f"/{self.prompt_chunk}" if self.prompt_chunk else "")

    def engine_args(self) -> dict:
        """LLM(...) keywords."""
        kw = {"kv_prompt_mode": self.prompt_mode}
        if self.prompt_chunk:
            kw["kv_prompt_chunk"] = self.prompt_chunk
        return kw

    def cli_args(self) -> list[str]:
        """`vllm serve` flags."""
        args = ["--kv-prompt-mode", self.prompt_mode]
        if self.prompt_chunk:
            args += ["--kv-prompt-chunk", str(self.prompt_chunk)]
        return args

    @classmethod
    def parse(cls, text: str) -> Variant:
        """'bulk', 'chunked', 'chunked:64', 'stream'."""
        mode, _, chunk = text.strip().partition(":")
        return cls(mode, int(chunk) if chunk else None)


BULK = Variant()


@dataclasses.dataclass
class Preset:
    name: str
    seq_len: int
    prompt_len: int
    num_requests: int
    budgets: tuple[int, ...]
    stock_full_seqs: int
    max_num_seqs: int  # the same ceiling for every engine
    block_size: int = 16  # TOVA's (its default with a policy)
    # Stock vLLM's: vLLM's CPU attention takes multiples of 32 only. The KV
    # memory (tokens) is the same; only its split into blocks differs.
    stock_block_size: int = 16
    rounds: int = 1
    dtype: str = "float32"
    model: str | None = None  # None: the embedded model; LLAMA2_7B_SHAPE: generated config
    load_format: str = "auto"
    enforce_eager: bool = True
    served_budgets: tuple[int, ...] = ()
    served_num_requests: int = 0
    # TOVA variants measured per budget, each on its own engine (the first is
    # the one the JSON's top-level per-budget fields describe).
    variants: tuple[Variant, ...] = (BULK,)
    # Efficiency (TOVA / ideal) this preset is measured against, and TOVA /
    # stock where nothing is evicted (never asserted).
    target_efficiency: float = 0.92
    target_nothing_evicted: float = 0.97

    def __post_init__(self):
        names = [v.name for v in self.variants]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"variants must be distinct and at least one; got {names}")

    @property
    def output_len(self) -> int:
        return self.seq_len - self.prompt_len

    @property
    def kv_tokens(self) -> int:
        """KV cache size in tokens (per layer), a whole number of blocks of either size."""
        unit = math.lcm(self.block_size, self.stock_block_size)
        return -(-self.stock_full_seqs * self.seq_len // unit) * unit

    def num_gpu_blocks(self, block_size: int) -> int:
        # +1: vLLM's block pool keeps one block back (its null block).
        return self.kv_tokens // block_size + 1

    def sustainable_concurrency(self, budget: int) -> int:
        """Sequences TOVA's KV memory holds at once at ``budget`` (each at its
        cap, ``ceil(budget / block_size)`` blocks)."""
        return max(1, (self.kv_tokens // self.block_size) // -(-budget // self.block_size))

    def ideal_concurrency(self, budget: int, peak_running: int) -> int:
        """The ideal's concurrency: what TOVA reached, capped at what its
        memory holds at the cap (admitting more, and the preemptions that
        follow, count against TOVA, not for the ideal)."""
        return max(1, min(peak_running, self.sustainable_concurrency(budget)))

    def ideal_blocks(self, budget: int, concurrency: int) -> int:
        """Stock blocks the ideal run needs: `concurrency` sequences of `budget` tokens."""
        return concurrency * -(-budget // self.stock_block_size)


PRESETS = {
    # Budgets of 1/4, 1/8 and 1/16 of the sequence, and one above it (nothing
    # evicted). Stock's KV memory holds 2 full sequences (256 tokens); with
    # TOVA's blocks of 16 a request holds ceil(budget / 16) blocks: 2 at 1/4
    # (8 sequences fit), 1 at 1/8 and at 1/16 (16 fit; at 1/16 a request still
    # takes one whole block), so 16 requests show the difference. Eight engine
    # starts (stock, TOVA per budget, the ideal per evicting budget), one
    # round: about 12-15 minutes on 2 quiet CPU cores (stock's four runs of
    # 16 x 120 tokens at 2 sequences at a time take about a third of it).
    "cpu": Preset(
        name="cpu",
        seq_len=128,
        prompt_len=8,
        num_requests=16,
        budgets=(32, 16, 8, 256),
        stock_full_seqs=2,
        max_num_seqs=32,
        stock_block_size=32,
        rounds=1,
        served_budgets=(16,),
        served_num_requests=8,
    ),
    # Long prompts, short outputs: 16 x (384 prompt + 128 output), budget 64
    # (1/8), KV memory for 2 full sequences (1,024 tokens: 64 TOVA blocks).
    # With bulk prompts a request holds its whole prompt (24 blocks) until
    # the prompt is processed, which limits how many are admitted; chunked
    # prompts (chunks of 64) hold at most budget + chunk = 128 slots (8
    # blocks). Both against the same stock runs; each against its ideal.
    "long-prompt": Preset(
        name="long-prompt",
        seq_len=512,
        prompt_len=384,
        num_requests=16,
        budgets=(64,),
        stock_full_seqs=2,
        max_num_seqs=32,
        stock_block_size=32,
        rounds=1,
        served_budgets=(64,),
        served_num_requests=16,
        variants=(BULK, Variant("chunked", 64)),
        target_efficiency=0.92,
    ),
    # The smoke test's: seconds of work, four engine starts (stock, TOVA bulk,
    # TOVA chunked, the ideal). TOVA's blocks are 32 here too, so a request
    # holds one block from admission to the end; prompts (24) exceed the
    # budget (16), so bulk reduces its prompt at its end and chunked (chunks of
    # 8) after every chunk.
    "tiny": Preset(
        name="tiny",
        seq_len=48,
        prompt_len=24,
        num_requests=6,
        budgets=(16,),
        stock_full_seqs=3,
        max_num_seqs=8,
        block_size=32,
        stock_block_size=32,
        served_budgets=(16,),
        served_num_requests=6,
        variants=(BULK, Variant("chunked", 8)),
    ),
    # The paper's shape (LLaMA-2-7B, 4,096-token sequences), random weights;
    # for a GPU machine (not run in this repository's CI, which has no GPU).
    "gpu": Preset(
        name="gpu",
        seq_len=4096,
        prompt_len=128,
        num_requests=128,
        budgets=(256, 512, 1024, 2048),
        stock_full_seqs=8,
        max_num_seqs=256,
        dtype="float16",
        model=LLAMA2_7B_SHAPE,
        load_format="dummy",
        enforce_eager=False,
        served_budgets=(512,),
        served_num_requests=128,
    ),
}

_LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def llama2_7b_shaped_model(folder: Path) -> str:
    """A LLaMA-2-7B-shaped config (for load_format="dummy": random weights,
    same compute and KV size per token) with the embedded model's tokenizer,
    so both offline and served runs work without any model hub."""
    from transformers import AutoConfig

    from tova_vllm.models import default_model

    folder.mkdir(parents=True, exist_ok=True)
    source = Path(default_model())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    vocab = AutoConfig.from_pretrained(source).vocab_size
    (folder / "config.json").write_text(json.dumps({**_LLAMA2_7B, "vocab_size": vocab}, indent=1))
    return str(folder)
