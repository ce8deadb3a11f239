"""Every shipped stack builds here (Debian, PyPI and npm only) and carries its tools."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from docker_support import container_settings

from podbay.engine.docker import DockerProvisioner
from podbay.engine.lifecycle import ProjectManager
from podbay.engine.stacks import dev_ids
from podbay.engine.store import Store

# What each stack must provide: the toolchain and, where packaged, a language server.
TOOLS = {
    "python": ("python3 --version; pylsp --version", ["Python 3.", "pylsp"]),
    "go": ("go version; gopls version", ["go version go1.", "golang.org/x/tools/gopls"]),
    "node": (
        "node --version; tsc --version; typescript-language-server --version",
        ["v", "Version ", "."],
    ),
    "jvm": ("java -version 2>&1; mvn -v", ["openjdk version", "Apache Maven"]),
    "ruby": ("ruby --version; bundle --version", ["ruby ", "Bundler version"]),
    "rust": ("rustc --version; cargo --version", ["rustc 1.", "cargo 1."]),
}


@pytest.fixture
async def manager(docker_engine: None, tmp_path: Path) -> AsyncIterator[ProjectManager]:
    settings = container_settings(tmp_path)
    provisioner = DockerProvisioner()
    async with await Store.open(tmp_path / "podbay.db") as store:
        yield ProjectManager(store, settings, provisioner)
    await provisioner.close()


@pytest.mark.slow
@pytest.mark.parametrize("stack", list(TOOLS))
async def test_stack_image_builds_and_has_its_toolchain(
    manager: ProjectManager, stack: str
) -> None:
    progress: list[str] = []

    async def record(text: str) -> None:
        progress.append(text)

    tag = await manager.ensure_image(stack, record)
    assert tag.startswith(f"podbay-{stack}:")
    assert await manager.docker.image_exists(tag)
    command, expected = TOOLS[stack]
    uid, gid = dev_ids()
    result = await asyncio.to_thread(
        subprocess.run,
        [
            "docker", "run", "--rm", "--network", "none", "--user", f"{uid}:{gid}",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--entrypoint", "bash", tag, "-lc", command,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    for fragment in expected:  # each tool answered, in order
        assert fragment in output, (fragment, output)
        output = output[output.index(fragment) + len(fragment) :]
    # A second call finds the image by its hash and builds nothing.
    progress.clear()
    assert await manager.ensure_image(stack, record) == tag
    assert progress == []
