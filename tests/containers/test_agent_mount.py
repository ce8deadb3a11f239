"""The agent CLIs in <data dir>/agents reach every project container, read-only."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from docker_support import DockerHarness, ssh

from podbay.engine.agent_cli import DEFAULT_VERSIONS, AgentCliStore


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm")
async def test_a_cli_fetched_after_the_project_exists_runs_in_its_container_read_only(
    dh: DockerHarness,
) -> None:
    await dh.ask("new project agents", "is ready")
    row = await dh.store.project_get("agents")
    assert row is not None and row.ssh_port is not None
    # Fetched after the container was created: a new CLI version needs no new container.
    cli = await AgentCliStore(dh.settings.data_dir).ensure("claude")
    version = DEFAULT_VERSIONS["claude"]
    assert cli.container_path == f"/opt/podbay/agents/claude/{version}/claude"
    result = await asyncio.to_thread(
        ssh,
        dh.manager.key_path("agents"),
        row.ssh_port,
        f"HOME=$(mktemp -d) {cli.container_path} --version; "
        f"touch /opt/podbay/agents/claude/{version}/claude 2>&1; "
        "touch /opt/podbay/agents/planted 2>&1 || true",
    )
    lines = result.stdout.splitlines()
    assert version in lines[0], result.stdout + result.stderr
    assert lines[1].startswith("touch: cannot touch"), lines
    assert lines[2].endswith("Read-only file system"), lines
    assert not (dh.settings.data_dir / "agents" / "planted").exists()
    attrs = await dh.manager.docker.inspect_raw(dh.manager.container_name("agents"))
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}  # type: ignore[attr-defined]
    assert mounts["/opt/podbay/agents"]["RW"] is False
    assert mounts["/opt/podbay/agents"]["Source"] == str(dh.settings.data_dir / "agents")
