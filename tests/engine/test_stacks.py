from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from podbay.engine import stacks as stacks_mod
from podbay.engine.stacks import (
    base_image_spec,
    detect_stack,
    discover_stacks,
    docker_dir,
    stack_image_spec,
)

SHIPPED = ("python", "node", "go", "rust", "jvm", "ruby")

EXAMPLES = {
    "python": ["pyproject.toml", "requirements.txt"],
    "node": ["package.json", "package-lock.json"],
    "go": ["go.mod", "main.go"],
    "rust": ["Cargo.toml", "Cargo.lock"],
    "jvm": ["pom.xml"],
    "ruby": ["Gemfile", "Gemfile.lock"],
}


def make(tmp_path: Path, files: list[str]) -> Path:
    for name in files:
        (tmp_path / name).write_text("")
    return tmp_path


def test_every_shipped_stack_has_a_fragment_and_markers() -> None:
    found = discover_stacks()
    assert tuple(found) == SHIPPED
    for stack in found.values():
        assert stack.markers, stack.name
        instructions = [ln.split()[0].upper() for ln in stack.fragment.splitlines() if ln.strip()]
        assert "FROM" not in instructions and "USER" not in instructions, stack.name


@pytest.mark.parametrize("stack", SHIPPED)
def test_markers_detect_each_stack(tmp_path: Path, stack: str) -> None:
    detection = detect_stack(make(tmp_path, EXAMPLES[stack]), discover_stacks())
    assert detection.stack == stack
    assert detection.reason.startswith("detected from ")


def test_most_marker_hits_wins_and_the_reason_says_why(tmp_path: Path) -> None:
    project = make(tmp_path, ["package.json", "pyproject.toml", "requirements.txt", "setup.py"])
    detection = detect_stack(project, discover_stacks())
    assert detection.stack == "python"
    assert "also matched node (1)" in detection.reason


def test_ties_are_broken_by_the_fixed_order(tmp_path: Path) -> None:
    detection = detect_stack(make(tmp_path, ["Cargo.toml", "go.mod"]), discover_stacks())
    assert detection.stack == "go"  # go comes before rust in STACK_ORDER
    assert stacks_mod.STACK_ORDER.index("go") < stacks_mod.STACK_ORDER.index("rust")


def test_no_markers_means_the_base_image(tmp_path: Path) -> None:
    detection = detect_stack(make(tmp_path, ["notes.txt"]), discover_stacks())
    assert detection.stack is None
    assert "base image" in detection.reason


def test_a_stack_is_added_by_adding_a_folder(tmp_path: Path) -> None:
    extra = tmp_path / "stacks" / "elixir"
    extra.mkdir(parents=True)
    (extra / "Dockerfile.fragment").write_text("RUN true\n")
    (extra / "markers").write_text("# elixir\nmix.exs\n")
    found = discover_stacks([tmp_path / "stacks"])
    assert "elixir" in found and found["elixir"].markers == ("mix.exs",)
    project = tmp_path / "proj"
    project.mkdir()
    assert detect_stack(make(project, ["mix.exs"]), found).stack == "elixir"


def test_image_tags_hash_every_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "docker"
    shutil.copytree(docker_dir(), copy)
    monkeypatch.setattr(stacks_mod, "docker_dir", lambda: copy)
    base = base_image_spec("debian:bookworm-slim", 1000, 1000)
    python = stack_image_spec(base, discover_stacks()["python"])
    assert base.tag.startswith("podbay-base:") and python.tag.startswith("podbay-python:")
    assert base_image_spec("debian:bookworm-slim", 1000, 1000).tag == base.tag
    assert base_image_spec("debian:bookworm-slim", 1001, 1000).tag != base.tag
    assert base_image_spec("debian:trixie-slim", 1000, 1000).tag != base.tag
    ca = tmp_path / "proxy-ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert base_image_spec("debian:bookworm-slim", 1000, 1000, [ca]).tag != base.tag
    (copy / "entrypoint.sh").write_text((copy / "entrypoint.sh").read_text() + "\n# edit\n")
    changed = base_image_spec("debian:bookworm-slim", 1000, 1000)
    assert changed.tag != base.tag
    # A stack image depends on its base, so a base change gives a new stack tag too.
    assert stack_image_spec(changed, discover_stacks()["python"]).tag != python.tag
    fragment = copy / "stacks" / "python" / "Dockerfile.fragment"
    fragment.write_text(fragment.read_text() + "\nRUN true\n")
    assert stack_image_spec(base, discover_stacks()["python"]).tag != python.tag
