"""patches/: for the installed vLLM, one upstream diff per seam, each still
applying to the installed source (checked, never applied)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.version import Version

from tova_vllm.patch import check_vllm_version

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "patches"
SEAM_DIR = REPO / "tova_vllm" / "patch"
NOT_SEAMS = {"__init__", "_seam"}

RETIRES = re.compile(r"^Retires (tova_vllm/patch/(\w+)\.py)", re.MULTILINE)
DIFF_GIT = re.compile(r"^diff --git a/(\S+) b/(\S+)$", re.MULTILINE)


def _version_dir() -> Path:
    v = Version(check_vllm_version().split("+")[0])
    return PATCHES / f"vllm-{v.major}.{v.minor}"


def _diffs() -> list[Path]:
    folder = _version_dir()
    return sorted(folder.glob("*.patch")) if folder.is_dir() else []


def _seams() -> list[str]:
    return sorted(p.stem for p in SEAM_DIR.glob("*.py") if p.stem not in NOT_SEAMS)


def _vllm_root() -> Path:
    """The directory holding the installed ``vllm`` package (site-packages or a
    source checkout), found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin, "vLLM is not installed"
    return Path(spec.origin).resolve().parent.parent


def _header(diff: Path) -> str:
    text = diff.read_text()
    return text[: text.find("\ndiff --git ")]


def _paths(diff: Path) -> list[str]:
    return [a for a, _ in DIFF_GIT.findall(diff.read_text())]


def _git_apply_check(*diffs: Path) -> subprocess.CompletedProcess:
    """``git apply --check -v`` in the directory above the installed vllm
    package. Inside an enclosing work tree (a virtualenv in a project's repo)
    git would skip the paths outside it and still exit 0, so repository
    discovery stops at that directory."""
    # git checks the diffs; its absence is a broken test environment, not a skip.
    assert shutil.which("git") is not None, "git is needed to check the upstream diffs"
    root = _vllm_root()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_CEILING_DIRECTORIES"] = str(root.parent)
    return subprocess.run(
        ["git", "apply", "--check", "-v", *map(str, diffs)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _assert_checked(result: subprocess.CompletedProcess, diffs: list[Path]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Skipped patch" not in output, output
    for diff in diffs:
        for path in _paths(diff):
            assert f"Checking patch {path}..." in output, (diff.name, path, output)


def _stat(paths: list[str]) -> dict[str, tuple[int, int]]:
    root = _vllm_root()
    return {p: (s.st_mtime_ns, s.st_size) for p in paths for s in [(root / p).stat()]}


def test_folder_for_installed_vllm_exists():
    folder = _version_dir()
    assert folder.is_dir(), (
        f"no upstream diffs for the installed vLLM {check_vllm_version()}: add "
        f"patches/{folder.name}/ with one diff per seam (see patches/README.md)"
    )
    assert _diffs(), f"patches/{folder.name}/ holds no .patch files"


def test_every_seam_is_retired_by_exactly_one_diff():
    seams = _seams()
    assert seams, f"no seam modules found in {SEAM_DIR}"
    retired: dict[str, list[str]] = {}
    for diff in _diffs():
        named = RETIRES.findall(_header(diff))
        assert len(named) == 1, f"{diff.name}: header must say 'Retires tova_vllm/patch/<seam>.py' once"
        path, seam = named[0]
        assert (REPO / path).is_file(), f"{diff.name} retires {path}, which does not exist"
        retired.setdefault(seam, []).append(diff.name)
    for seam in seams:
        assert seam in retired, (
            f"seam tova_vllm/patch/{seam}.py has no upstream diff in "
            f"patches/{_version_dir().name}/ (header 'Retires tova_vllm/patch/{seam}.py')"
        )
        assert len(retired[seam]) == 1, f"seam {seam} is retired by several diffs: {retired[seam]}"


@pytest.mark.parametrize("diff", _diffs(), ids=lambda p: p.name)
def test_diff_is_upstream_style(diff: Path):
    assert re.match(r"^\d{4}-[a-z0-9-]+\.patch$", diff.name), diff.name
    header = _header(diff)
    assert re.search(r"^Subject: \[PATCH[^\]]*\] \S", header, re.MULTILINE), f"{diff.name}: no Subject:"
    text = diff.read_text()
    pairs = DIFF_GIT.findall(text)
    assert pairs, f"{diff.name}: no 'diff --git' sections"
    for a, b in pairs:
        assert a == b and a.startswith("vllm/"), (diff.name, a, b)
        assert f"\n--- a/{a}\n" in text or "\n--- /dev/null\n" in text, (diff.name, a)
        assert f"\n+++ b/{a}\n" in text or "\n+++ /dev/null\n" in text, (diff.name, a)


@pytest.mark.parametrize("diff", _diffs(), ids=lambda p: p.name)
def test_diff_applies_to_installed_vllm(diff: Path):
    before = _stat(_paths(diff))
    _assert_checked(_git_apply_check(diff), [diff])
    assert _stat(_paths(diff)) == before, "the check modified the installed vLLM"


def test_all_diffs_apply_together():
    diffs = _diffs()
    if not diffs:
        pytest.fail("no diffs for the installed vLLM")
    _assert_checked(_git_apply_check(*diffs), diffs)


def test_check_rejects_a_stale_diff(tmp_path):
    """The check is not vacuous: a diff whose context no longer matches fails."""
    diffs = _diffs()
    if not diffs:
        pytest.fail("no diffs for the installed vLLM")
    lines = diffs[0].read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("@@"))
    context = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(" "))
    lines[context] = " tova-vllm: this context line is not in vLLM\n"
    stale = tmp_path / "stale.patch"
    stale.write_text("".join(lines))
    result = _git_apply_check(stale)
    assert result.returncode != 0, result.stdout + result.stderr
