"""Workload presets. Sequences are ``seq_len`` tokens (``prompt_len`` prompt +
the rest output, EOS ignored); budgets are TOVA's per-sequence token budgets.
The KV cache has the same memory for every engine: enough for
``stock_full_seqs`` full sequences (the paper's shape: stock vLLM fits only a
few, while a budget of 1/8 of the sequence fits about 8x more)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

LLAMA2_7B_SHAPE = "llama-2-7b-shape"


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

    def ideal_blocks(self, budget: int, concurrency: int) -> int:
        """Stock blocks the ideal run needs: `concurrency` sequences of `budget` tokens."""
        return concurrency * -(-budget // self.stock_block_size)


PRESETS = {
    # <= 15 minutes on 2 busy CPU cores, engine starts included (four: stock,
    # TOVA per budget, the ideal for budget 16). Budget 16 is 1/8 of the sequence; 256 exceeds it
    # (nothing evicted). Stock's KV memory holds 2 full sequences; TOVA's
    # holds 8 at budget 16 (2 blocks of 16 each).
    "cpu": Preset(
        name="cpu",
        seq_len=128,
        prompt_len=8,
        num_requests=8,
        budgets=(16, 256),
        stock_full_seqs=2,
        max_num_seqs=32,
        stock_block_size=32,
        rounds=2,  # others share these CPUs: two alternations even out their load
        served_budgets=(16,),
        served_num_requests=8,
    ),
    # The smoke test's: seconds of work, three engine starts. TOVA's blocks are
    # 32 here too, so a request holds one block from admission to the end.
    "tiny": Preset(
        name="tiny",
        seq_len=48,
        prompt_len=4,
        num_requests=6,
        budgets=(16,),
        stock_full_seqs=3,
        max_num_seqs=8,
        block_size=32,
        stock_block_size=32,
        served_budgets=(16,),
        served_num_requests=6,
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
