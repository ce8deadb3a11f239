"""new project / status / delete against the real Docker engine and the real ssh client."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from docker_support import DM, DockerHarness, expected_uid, ssh

from podbay.engine.docker import MANAGED_LABEL


async def inspect(dh: DockerHarness, project: str) -> dict[str, object]:
    return await dh.manager.docker.inspect_raw(dh.manager.container_name(project))


async def test_new_python_project_gives_unprivileged_ssh_into_the_workspace(
    dh: DockerHarness,
) -> None:
    reply = await dh.ask("new project demo --stack python", "is ready")
    row = await dh.store.project_get("demo")
    assert row is not None and row.state == "ready" and row.ssh_port is not None
    key = dh.manager.key_path("demo")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    alias = dh.manager.host_alias("demo")
    known = dh.manager.known_hosts()
    assert (
        f"ssh -i {key} -p {row.ssh_port} -o UserKnownHostsFile={known} -o HostKeyAlias={alias} "
        "dev@127.0.0.1"
    ) in reply
    assert f"Host {alias}" in reply and "VS Code" in reply and "JetBrains" in reply
    assert "Zed" in reply and "Neovim" in reply and "Emacs" in reply

    result = await asyncio.to_thread(
        ssh,
        key,
        row.ssh_port,
        "python3 --version; id -u; grep CapEff /proc/self/status; pwd; "
        "echo from-ssh > /workspace/made-over-ssh.txt",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Python 3.")
    assert int(lines[1]) == expected_uid() != 0
    assert lines[2].split() == ["CapEff:", "0000000000000000"]
    assert lines[3] == "/workspace"
    made = Path(row.path) / "made-over-ssh.txt"
    assert made.read_text() == "from-ssh\n"
    assert made.stat().st_uid == expected_uid()
    # The session now uses the project, so freeform goes to its agent in that directory.
    active = await dh.engine.active_project(DM)
    assert active is not None and active.name == "demo"


async def test_container_is_hardened_and_its_environment_holds_no_secret(
    dh: DockerHarness,
) -> None:
    token = "ghp_" + "x" * 30
    await dh.ask(f"new project locked --cpus 1.5 --memory 512m --token {token}", "is ready")
    attrs = await inspect(dh, "locked")
    host = attrs["HostConfig"]
    config = attrs["Config"]
    assert isinstance(host, dict) and isinstance(config, dict)
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["NanoCpus"] == 1_500_000_000
    assert host["Memory"] == 512 * 1024 * 1024
    assert host["PidsLimit"] == 1024
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    assert config["User"] == f"{expected_uid()}:{expected_uid()}"
    assert config["Labels"][MANAGED_LABEL] == "1"
    assert config["Labels"]["podbay.project"] == "locked"
    everything = repr(attrs)
    assert token not in everything, "the token must not appear anywhere in docker inspect"
    creds = dh.manager.secrets_dir("locked") / "git-credentials"
    assert oct(creds.stat().st_mode & 0o777) == "0o600"
    assert token in creds.read_text()
    # ...and it never reached the inbox or a reply.
    assert all(token not in t for t in dh.transport.texts())
    cursor = await dh.store._db.execute("SELECT text FROM inbox")  # type: ignore[attr-defined]
    assert all(token not in r[0] for r in await cursor.fetchall())
    row = await dh.store.project_get("locked")
    assert row is not None and row.ssh_port is not None
    # git inside the container can use the token, yet no process environment holds it.
    result = await asyncio.to_thread(
        ssh,
        dh.manager.key_path("locked"),
        row.ssh_port,
        "printf 'protocol=https\\nhost=github.com\\n\\n' | git credential fill "
        "| grep -c '^password=ghp_'; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' "
        "| grep -c ghp_ || true",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "0"]


@pytest.mark.parametrize("docker_options", [{"network": "bridge"}])
async def test_bridge_network_publishes_ssh_on_loopback_only(dh: DockerHarness) -> None:
    await dh.ask("new project bridged", "is ready")
    attrs = await inspect(dh, "bridged")
    row = await dh.store.project_get("bridged")
    assert row is not None
    bindings = attrs["HostConfig"]["PortBindings"]  # type: ignore[index]
    assert bindings == {
        f"{row.ssh_port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(row.ssh_port)}]
    }
    assert "podbay" in attrs["NetworkSettings"]["Networks"]  # type: ignore[index]


async def test_status_shows_containers_and_flags_drift_with_one_list_call(
    dh: DockerHarness,
) -> None:
    await dh.ask("new project alpha", "is ready")
    calls = {"list": 0, "inspect": 0}
    docker = dh.manager.docker
    original_list, original_inspect = docker.list_managed, docker.inspect

    async def counting_list() -> list:  # type: ignore[type-arg]
        calls["list"] += 1
        return await original_list()

    async def counting_inspect(name: str):  # type: ignore[no-untyped-def]
        calls["inspect"] += 1
        return await original_inspect(name)

    docker.list_managed = counting_list  # type: ignore[method-assign]
    docker.inspect = counting_inspect  # type: ignore[method-assign]
    text = await dh.ask("status", "Projects (1)")
    assert "`alpha` · base · running · up " in text and " · ssh 22" in text
    assert calls == {"list": 1, "inspect": 0}

    name = dh.manager.container_name("alpha")
    await asyncio.to_thread(
        subprocess.run, ["docker", "stop", "-t", "1", name], check=True, capture_output=True
    )
    dh.transport.sent.clear()
    text = await dh.ask("status", "Projects (1)")
    assert "`alpha` · base · exited(" in text
    await asyncio.to_thread(subprocess.run, ["docker", "rm", name], check=True, capture_output=True)
    dh.transport.sent.clear()
    text = await dh.ask("status", "Projects (1)")
    assert "container missing" in text


async def test_status_of_one_project_shows_git_state_and_limits(dh: DockerHarness) -> None:
    await dh.ask("new project detail --memory 1g", "is ready")
    row = await dh.store.project_get("detail")
    assert row is not None
    Path(row.path, "notes.txt").write_text("x")
    text = await dh.ask("status detail", "**detail**")
    assert "image: podbay-base:" in text
    assert "limits: 2 CPUs, 1g memory" in text
    assert "git: branch" in text and "1 uncommitted" in text


async def test_delete_needs_the_requesters_confirmation_and_keeps_the_source(
    dh: DockerHarness,
) -> None:
    await dh.ask("new project doomed", "is ready")
    row = await dh.store.project_get("doomed")
    assert row is not None
    source = Path(row.path)
    (source / "keep.txt").write_text("precious")
    proposal = await dh.ask("delete doomed", "Reply `confirm`")
    assert "is kept" in proposal and str(row.ssh_port) in proposal
    await dh.say("confirm", user="bob")
    await dh.transport.wait_for_text("Only memory:alice can confirm", session=DM)
    assert await dh.manager.docker.inspect(dh.manager.container_name("doomed")) is not None
    done = await dh.ask("confirm", "Deleted `doomed`")
    assert "Source kept" in done
    assert await dh.manager.docker.inspect(dh.manager.container_name("doomed")) is None
    assert await dh.store.project_get("doomed") is None
    assert not dh.manager.keys_dir("doomed").exists()
    assert (source / "keep.txt").read_text() == "precious"
    assert row.ssh_port not in await dh.store.ports_in_use()


async def test_delete_proposal_expires(dh: DockerHarness) -> None:
    await dh.ask("new project lingering", "is ready")
    clock = [1000.0]
    dh.dispatcher.proposals._clock = lambda: clock[0]  # type: ignore[attr-defined]
    await dh.ask("delete lingering", "Reply `confirm`")
    clock[0] += dh.settings.dispatcher.confirm_timeout_s + 1
    await dh.ask("confirm", "Nothing to confirm")
    assert await dh.store.project_get("lingering") is not None


async def test_purge_moves_the_source_to_the_trash_and_it_can_be_restored(
    dh: DockerHarness,
) -> None:
    await dh.ask("new project trashy", "is ready")
    row = await dh.store.project_get("trashy")
    assert row is not None
    Path(row.path, "data.txt").write_text("keep me")
    await dh.ask("delete trashy --purge", "moves to podbay's trash")
    done = await dh.ask("confirm", "Deleted `trashy`")
    assert "moved to the trash" in done
    assert not Path(row.path).exists()
    entries = dh.manager.trash_entries()
    assert [original for _, original in entries] == [row.path]
    restored = dh.manager.trash_restore(entries[0][0])
    assert (restored / "data.txt").read_text() == "keep me"
    assert dh.manager.trash_entries() == []


async def test_delete_never_touches_a_container_without_podbay_labels(
    dh: DockerHarness,
) -> None:
    name = dh.manager.container_name("stranger")
    await asyncio.to_thread(
        subprocess.run,
        ["docker", "create", "--name", name, "debian:bookworm-slim", "true"],
        check=True,
        capture_output=True,
    )
    try:
        from podbay.errors import EngineError

        with pytest.raises(EngineError, match="lacks podbay's labels"):
            await dh.manager.docker.remove(name)
        assert await dh.manager.docker.inspect(name) is not None
    finally:
        await asyncio.to_thread(
            subprocess.run, ["docker", "rm", "-f", name], check=False, capture_output=True
        )


async def test_restart_rebuild_ssh_and_logs(dh: DockerHarness) -> None:
    await dh.ask("new project cycle", "is ready")
    row = await dh.store.project_get("cycle")
    assert row is not None and row.ssh_port is not None
    key = dh.manager.key_path("cycle")

    def host_key() -> str:
        out = subprocess.run(
            ["ssh-keyscan", "-t", "ed25519", "-p", str(row.ssh_port), "127.0.0.1"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        ).stdout
        return out.split()[-1] if out.strip() else ""

    before = await asyncio.to_thread(host_key)
    assert before
    await dh.ask("restart cycle", "Restarted `cycle`")
    await dh.ask("rebuild cycle", "Rebuilt `cycle`")
    assert await asyncio.to_thread(host_key) == before, "rebuild must keep the host key"
    result = await asyncio.to_thread(ssh, key, row.ssh_port, "echo still-here")
    assert result.stdout.strip() == "still-here"
    info = await dh.ask("ssh cycle", "SSH:")
    assert f"-p {row.ssh_port}" in info
    logs = await dh.ask("logs cycle -n 5", "log lines of `cycle`")
    assert "```" in logs


async def test_busy_project_refuses_a_second_job(dh: DockerHarness) -> None:
    await dh.ask("new project busy", "is ready")
    await dh.say("restart busy")
    await dh.say("rebuild busy")
    await dh.transport.wait_for_text("busy: restart running for busy", session=DM, timeout=120)
    await dh.transport.wait_for_text("Restarted `busy`", session=DM, timeout=120)


def test_ssh_config_command_prints_a_block_per_project(tmp_path: Path) -> None:
    # Exercised through the CLI in test_cli_containers.py; here the pure renderer.
    from podbay.engine.ssh import SshTarget, ssh_config_block

    block = ssh_config_block(SshTarget("pb-demo", 2201, tmp_path / "k", tmp_path / "kh"))
    assert block.splitlines()[0] == "Host pb-demo"
    assert "  Port 2201" in block and f"  IdentityFile {tmp_path / 'k'}" in block
    assert "  HostKeyAlias pb-demo" in block and f"  UserKnownHostsFile {tmp_path / 'kh'}" in block
    assert "  StrictHostKeyChecking yes" in block
    spaced = ssh_config_block(SshTarget("pb-demo", 2201, tmp_path / "a b", None))
    assert '  IdentityFile "' in spaced and "StrictHostKeyChecking accept-new" in spaced


async def test_files_created_over_ssh_belong_to_the_configured_uid(dh: DockerHarness) -> None:
    await dh.ask("new project owner", "is ready")
    row = await dh.store.project_get("owner")
    assert row is not None and row.ssh_port is not None
    result = await asyncio.to_thread(
        ssh, dh.manager.key_path("owner"), row.ssh_port, "mkdir -p sub && touch sub/f"
    )
    assert result.returncode == 0, result.stderr
    made = Path(row.path) / "sub" / "f"
    assert made.exists() and os.stat(made).st_uid == expected_uid()
