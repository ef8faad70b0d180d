"""The CPU decode path: a C++ operator that reads the kept slots in place.

On a CPU decode is bound by memory traffic, so a request that keeps ``k``
tokens should decode about as fast as a request whose whole context is ``k``
long. The portable path (`tova_vllm.backend.decode`) copies before it
computes: it gathers every kept block of every row, lays K|V out heads first
with the new tokens, then runs a dozen PyTorch operations. This operator
(``csrc/cpu_decode.cpp``) does, per layer call, in one pass over each row's
keys and one over its values, straight from the page through the block ids:
the attention of each row's new query over its held slots and its own K/V,
the probabilities the policy reads (summed per KV head, with the slots'
positions), and, for the policies it implements (`EvictionPolicy.
cuda_fast_path`: TOVA's rule) with one process holding every head, the choice
and the write of the new token. Other policies that read only attention and
positions get the probabilities and positions and choose in PyTorch (a few
small operations); policies that read keys or accumulate take the portable
path for their own rows (the builder splits the wave, `builder.split_for_cpu`).

The operator is compiled once per machine with the installed PyTorch's C++
extension support (the compiler vLLM's CPU build needs for ``torch.compile``)
into ``$TOVA_VLLM_CACHE_DIR/cpu_decode/`` (default
``${XDG_CACHE_HOME:-~/.cache}/tova-vllm``), and checked once per dtype pair
and head size against the portable path on a small wave. Where there is no
compiler, the build fails or the check disagrees, decode keeps the portable
path and says so once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
from pathlib import Path

import torch

from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_decode.cpp"
CACHE_ENV = "TOVA_VLLM_CACHE_DIR"
# TOVA_VLLM_CPU_DECODE_KERNEL=0 keeps every CPU decode wave on the portable path.
ENABLE_ENV = "TOVA_VLLM_CPU_DECODE_KERNEL"


def _cpu_flags() -> str:
    """The CPU's feature flags: the build targets this machine's ISA
    (``-march=native``), so a cache folder shared between machines must not
    hand one machine's build to another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()


def _build_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tova-vllm"
    )
    # The installed PyTorch's folder too: two environments with the same
    # version write different include paths into the build file, and would
    # rebuild each other's operator in turn.
    torch_dir = os.path.dirname(torch.__file__)
    key = hashlib.sha256(
        f"{torch.__version__}|{torch_dir}|{_cpu_flags()}|{SOURCE.read_bytes().hex()}".encode()
    ).hexdigest()[:16]
    return Path(root) / "cpu_decode" / key


@functools.cache
def operator():
    """The compiled operator module, or None (logged once) where it cannot be
    built."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        logger.info("tova-vllm: %s=0: CPU decode uses the portable PyTorch path", ENABLE_ENV)
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        logger.warning(
            "tova-vllm: no C++ compiler (%r, or $CXX) found, so the CPU decode operator cannot be built; "
            "decode runs the portable PyTorch path (slower). Install one (e.g. g++) to enable it.",
            compiler,
        )
        return None
    from torch.utils.cpp_extension import load

    build = _build_dir()
    build.mkdir(parents=True, exist_ok=True)
    # Built from a copy in the folder (named by the source's hash): another
    # checkout of the same source then reuses the build instead of redoing it.
    source = build / SOURCE.name
    if not source.exists() or source.read_bytes() != SOURCE.read_bytes():
        tmp = source.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(SOURCE.read_bytes())
        tmp.replace(source)
    flags = ["-O3", "-march=native", "-ffp-contract=fast"]
    try:
        with _build_lock(build):
            return load(
                name=f"tova_cpu_decode_{build.name}",
                sources=[str(source)],
                extra_cflags=flags,
                extra_ldflags=[],
                build_directory=str(build),
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001 -- any build failure: the portable path
        logger.warning(
            "tova-vllm: the CPU decode operator failed to build in %s (%s); decode runs the "
            "portable PyTorch path (slower)",
            build,
            e,
        )
        return None


@contextlib.contextmanager
def _build_lock(build: Path):
    """One process at a time loads (and builds) the operator in ``build``.
    PyTorch's own lock is a file that a process killed while it holds it
    leaves behind, and every later process would wait on it for ever; this
    lock (``flock``) dies with its holder, and whoever holds it knows that a
    leftover PyTorch lock file is stale."""
    import fcntl

    with open(build / "tova-build.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            stale = build / "lock"  # torch.utils.file_baton's, inside `load`
            if stale.exists():
                logger.info("tova-vllm: removing a stale build lock %s (its process died)", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@functools.cache
def usable(model_dtype: torch.dtype, cache_dtype: torch.dtype, head_size: int) -> bool:
    """Whether the operator exists and agrees with the portable path on a
    small wave of these dtypes and head size (once per process)."""
    if operator() is None:
        return False
    try:
        _check(model_dtype, cache_dtype, head_size)
    except Exception as e:  # noqa: BLE001 -- any disagreement: the portable path
        logger.info(
            "tova-vllm: the CPU decode operator is not used for %s (cache %s), head size %d (%s); "
            "decode runs the portable PyTorch path",
            model_dtype,
            cache_dtype,
            head_size,
            e,
        )
        return False
    logger.info(
        "tova-vllm: CPU decode reads the kept slots in place (C++ operator) for %s, head size %d",
        model_dtype,
        head_size,
    )
    return True


def decode_wave(query, key, value, slots, block_size, tokens, blocks, held, budgets, positions, scale, output,
                probs=None, slot_positions=None, select=False) -> None:  # fmt: skip
    """Call the operator (see ``csrc/cpu_decode.cpp``): ``query`` / ``key`` /
    ``value`` / ``output`` are the step's ``[T, H, D]`` tensors, ``tokens``
    the wave's rows' token indices; ``probs`` (float32) and
    ``slot_positions`` (int32) ``[R, Hkv, n + 1]`` receive the per-KV-head
    summed probabilities and the candidates' positions."""
    operator().decode_wave(
        query, key, value, slots, block_size, tokens, blocks, held, budgets, positions, float(scale), output,
        probs, slot_positions, bool(select),
    )  # fmt: skip


def implements(policy) -> bool:
    """Whether the operator serves a policy's rows: it reads the newest
    query's probabilities and the slots' positions, not keys, and keeps no
    accumulated state."""
    return not policy.reads_keys and not policy.accumulates


def forward_wave(layer, w, query, key, value, view, output) -> None:
    """One wave on the operator (`DecodeWave.cpu_select` set): attention
    straight from the page; with ``cpu_select`` the operator also evicts and
    writes, else each policy group chooses from its probabilities and
    positions here, and one indexed copy writes every row's new token."""
    hkv, dim = layer.num_kv_heads, layer.head_size
    q = query.view(-1, layer.num_heads, dim)
    k, v = key.view(-1, hkv, dim), value.view(-1, hkv, dim)
    out = output.view(-1, layer.num_heads, dim)
    if w.cpu_select:
        decode_wave(q, k, v, view.slots, view.block_size, w.token_ids, w.blocks, w.held, w.budgets, w.positions,
                    layer.scale, out, select=True)  # fmt: skip
        return
    probs = torch.empty(w.size, hkv, w.num_cols, dtype=torch.float32)
    positions = None
    if any(g.policy.reads_positions for g in w.groups):
        positions = torch.empty(w.size, hkv, w.num_cols, dtype=torch.int32)
    decode_wave(q, k, v, view.slots, view.block_size, w.token_ids, w.blocks, w.held, w.budgets, w.positions,
                layer.scale, out, probs, positions)  # fmt: skip
    _select_and_write(layer, w, probs, positions, k, v, view)


def _select_and_write(layer, w, probs, positions, k, v, view) -> None:
    from tova_vllm.policies import Candidates, selection

    hkv, group = layer.num_kv_heads, layer.num_queries_per_kv
    victims = []
    for g in w.groups:
        rs = g.rows

        def attention(rs=rs):
            total = probs[rs].sum(dim=1)  # every query head of this process
            if layer.tp_size > 1:
                total = layer.all_reduce(total.contiguous())
            return (total / (layer.num_heads * layer.tp_size)).unsqueeze(1)

        cand = Candidates(
            newest=w.positions[rs],
            budget=w.budgets[rs],
            valid=w.valid[rs],
            num_kv_heads=hkv,
            attention=attention,
            attention_per_kv_head=lambda rs=rs: probs[rs] / group,
            positions=lambda rs=rs: positions[rs].long(),
            keys=None,
            state=None,
        )
        pri = selection.as_priority(g.policy.priority(cand))
        if pri.dim() == 2:
            pri = pri.unsqueeze(1)
        victims.append(torch.argmin(pri + w.select_bias[rs], dim=-1))  # [Rg, 1 or Hkv]
    width = 1 if w.per_layer else hkv  # a per-layer choice covers every head's part of the slot
    victim = victims[0] if len(victims) == 1 else torch.cat([x.expand(-1, width) for x in victims])
    dst = w.col_ids.gather(1, victim)  # flat slots (the sink slot: nowhere)
    cd = view.cache.dtype
    t = w.token_ids
    new = torch.cat((k[t].to(cd), v[t].to(cd), w.new_side.expand(-1, hkv, -1)), dim=-1)
    if w.per_layer:
        view.slots.index_copy_(0, dst[:, 0], new)
    else:
        view.slots[dst, torch.arange(hkv)] = new


def _check(model_dtype: torch.dtype, cache_dtype: torch.dtype, head_size: int) -> None:
    """The operator against a float64 computation of the same wave: rows
    below, at and over their budget, GQA, blocks out of order."""
    from tova_vllm.backend.slots import SlotView, encode_side, side_elements

    gen = torch.Generator().manual_seed(0)
    hq, hkv, bs, nblocks = 4, 2, 4, 12
    d = head_size
    cache = torch.zeros(nblocks, bs, hkv, 2 * d + side_elements(cache_dtype), dtype=cache_dtype).transpose(1, 2)
    view = SlotView(cache, d)
    view.slots[..., : 2 * d] = torch.randn(nblocks * bs, hkv, 2 * d, generator=gen).to(cache_dtype)
    view.slots[..., 2 * d :] = encode_side(torch.arange(nblocks * bs).unsqueeze(1).expand(-1, hkv), cache_dtype)
    blocks = torch.tensor([[5, 2, 9], [7, 1, 0], [3, 11, 4]], dtype=torch.long)
    held = torch.tensor([10, 3, 12], dtype=torch.long)
    budgets = torch.tensor([10, 8, 12], dtype=torch.long)
    tokens = torch.tensor([2, 0, 1], dtype=torch.long)
    q = torch.randn(3, hq, d, generator=gen).to(model_dtype)
    k = torch.randn(3, hkv, d, generator=gen).to(model_dtype)
    v = torch.randn(3, hkv, d, generator=gen).to(model_dtype)
    pos = torch.tensor([100, 101, 102], dtype=torch.long)
    scale = d**-0.5
    before = view.slots.clone()
    out = torch.full_like(q, float("nan"))
    probs = torch.empty(3, hkv, blocks.shape[1] * bs + 1, dtype=torch.float32)
    decode_wave(q, k, v, view.slots, bs, tokens, blocks, held, budgets, pos, scale, out, probs, None, True)
    tol = 1e-4 if model_dtype == torch.float32 and cache_dtype == torch.float32 else 3e-2
    for i in range(3):
        r = int(tokens[i])
        n = int(held[i])
        ids = (blocks[i].repeat_interleave(bs) * bs + torch.arange(bs).repeat(blocks.shape[1]))[:n]
        keys = torch.cat((before[ids, :, :d].double(), k[r].double().unsqueeze(0)))  # [n + 1, Hkv, D]
        vals = torch.cat((before[ids, :, d : 2 * d].double(), v[r].double().unsqueeze(0)))
        qr = q[r].double().view(hkv, hq // hkv, d)
        p = torch.softmax(torch.einsum("hgd,nhd->hgn", qr, keys) * scale, dim=-1)
        want = torch.einsum("hgn,nhd->hgd", p, vals).reshape(hq, d)
        err = (out[r].double() - want).abs().max().item()
        if not err < tol:
            raise RuntimeError(f"attention differs from float64 by {err:.3g}")
        mean = p.sum(dim=(0, 1)) / hq
        if n < int(budgets[i]):
            dst = int(ids[n]) if n < ids.numel() else int(blocks[i, n // bs] * bs + n % bs)
        else:
            victim = int(torch.argmin(mean))
            dst = int(ids[victim]) if victim < n else None
        if dst is not None:
            want_cell = torch.cat((k[r].to(cache_dtype), v[r].to(cache_dtype)), dim=-1)
            if not torch.equal(view.slots[dst, :, : 2 * d], want_cell):
                raise RuntimeError("the new token was not written where the float64 rule puts it")
            if int(view.positions[dst, 0]) != int(pos[i]):
                raise RuntimeError("the new token's position was not written")
