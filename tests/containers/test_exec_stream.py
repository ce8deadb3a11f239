"""Streaming exec in a project container: output as it comes, stdin, exit code, and a kill
of everything the exec started (real Docker engine)."""

from __future__ import annotations

import asyncio
import os
import secrets

from docker_support import DockerHarness

from podbay.engine.docker import DockerProvisioner, ExecStream
from podbay.engine.stacks import dev_ids

STEP_S = 30  # bound on each await: a hang fails the test instead of stalling the run


async def _project(dh: DockerHarness, project: str) -> tuple[DockerProvisioner, str, str]:
    await dh.ask(f"new project {project}", "is ready")
    uid, gid = dev_ids()
    return dh.manager.docker, dh.manager.container_name(project), f"{uid}:{gid}"


async def _read_all(stream: ExecStream) -> dict[str, bytes]:
    out = {"stdout": b"", "stderr": b""}
    while (chunk := await asyncio.wait_for(stream.read(), STEP_S)) is not None:
        out[chunk[0]] += chunk[1]
    return out


async def _commands(docker: DockerProvisioner, name: str, user: str) -> list[str]:
    """Every process's command line, as `ps` in the container shows it."""
    result = await docker.exec_run(name, ["ps", "-eo", "args="], user=user, timeout_s=20)
    assert result.exit_code == 0, result.stderr
    return [line.strip() for line in result.stdout.splitlines()]


async def test_output_arrives_chunk_by_chunk_on_its_own_stream_and_the_exit_code_is_returned(
    dh: DockerHarness,
) -> None:
    docker, name, user = await _project(dh, "streamy")
    # Each line read from stdin is echoed at once, to stderr when it starts with "err":
    # a chunk arriving before stdin is closed shows output is streamed, not collected.
    echo = "while read -r l; do case $l in err*) echo $l >&2;; *) echo $l;; esac; done; exit 3"
    async with await docker.exec_stream(
        name, ["sh", "-c", echo], user=user, env={}, tag="run-stream"
    ) as stream:
        for line, expected in [
            (b"out one\n", ("stdout", b"out one\n")),
            (b"err two\n", ("stderr", b"err two\n")),
            (b"out three\n", ("stdout", b"out three\n")),
            (b"err four\n", ("stderr", b"err four\n")),
        ]:
            await stream.write(line)
            assert await asyncio.wait_for(stream.read(), STEP_S) == expected
        await stream.close_stdin()
        assert await asyncio.wait_for(stream.read(), STEP_S) is None
        assert await asyncio.wait_for(stream.wait(), STEP_S) == 3
        assert await stream.read() is None  # stays at the end

    async with await docker.exec_stream(
        name, ["sh", "-c", "echo a; echo b >&2; exit 7"], user=user, env={}, tag="run-short"
    ) as stream:
        assert await _read_all(stream) == {"stdout": b"a\n", "stderr": b"b\n"}
        assert await asyncio.wait_for(stream.wait(), STEP_S) == 7


async def test_a_megabyte_piped_into_cat_comes_back_whole(dh: DockerHarness) -> None:
    docker, name, user = await _project(dh, "piped")
    data = os.urandom(1 << 20)
    async with await docker.exec_stream(name, ["cat"], user=user, env={}, tag="run-cat") as stream:

        async def feed() -> None:
            for start in range(0, len(data), 100_000):
                await stream.write(data[start : start + 100_000])
            await stream.close_stdin()

        # Written while read: cat's output pipe fills long before 1 MB is in.
        writer = asyncio.create_task(feed())
        out = await _read_all(stream)
        await asyncio.wait_for(writer, STEP_S)
        assert out["stderr"] == b""
        assert len(out["stdout"]) == len(data)
        assert out["stdout"] == data
        assert await asyncio.wait_for(stream.wait(), STEP_S) == 0


async def test_kill_tagged_ends_the_whole_tree_and_leaves_other_runs_alone(
    dh: DockerHarness,
) -> None:
    docker, name, user = await _project(dh, "killy")
    tree = (
        "sleep 4321 & "  # a plain background child
        "setsid sleep 4321 & "  # in a session of its own
        "env -u PODBAY_RUN sleep 4321 & "  # without the tag variable
        "sh -c 'trap \"\" TERM; sleep 4321; :' & "  # ignores SIGTERM (so does its sleep)
        "echo started; wait"
    )
    other = await docker.exec_stream(
        name, ["sh", "-c", "echo up; sleep 9876"], user=user, env={}, tag="run-other"
    )
    async with (
        other,
        await docker.exec_stream(
            name, ["sh", "-c", tree], user=user, env={}, tag="run-tree"
        ) as stream,
    ):
        assert await asyncio.wait_for(stream.read(), STEP_S) == ("stdout", b"started\n")
        assert await asyncio.wait_for(other.read(), STEP_S) == ("stdout", b"up\n")
        # "started" can come before the background children have exec'd their sleeps.
        deadline = asyncio.get_running_loop().time() + STEP_S
        while (await _commands(docker, name, user)).count("sleep 4321") < 4:
            assert asyncio.get_running_loop().time() < deadline, "the tree never started"
        # The shell, four sleeps and the trapping shell; the env-less sleep is found too.
        assert len(await docker.tagged_processes(name, "run-tree")) == 6

        left = await asyncio.wait_for(docker.kill_tagged(name, "run-tree", grace_s=1.0), STEP_S)

        assert left == []
        assert await docker.tagged_processes(name, "run-tree") == []
        commands = await _commands(docker, name, user)
        assert not [c for c in commands if "4321" in c], commands
        assert "sleep 9876" in commands  # another run's process is untouched
        assert await asyncio.wait_for(stream.read(), STEP_S) is None
        code = await asyncio.wait_for(stream.wait(), STEP_S)
        assert code in (128 + 15, 128 + 9)  # SIGTERM or SIGKILL

        assert await docker.tagged_processes(name, "run-other") != []
        assert await docker.kill_tagged(name, "run-other", grace_s=1.0) == []
        assert await asyncio.wait_for(other.wait(), STEP_S) == 128 + 15
        assert not [c for c in await _commands(docker, name, user) if "9876" in c]


async def test_exec_env_reaches_the_process_but_never_docker_inspect(dh: DockerHarness) -> None:
    docker, name, user = await _project(dh, "envy")
    secret = f"sk-test-{secrets.token_hex(16)}"
    async with await docker.exec_stream(
        name, ["sh", "-c", "cat /proc/self/environ"], user=user, env={"API_KEY": secret}, tag="r9"
    ) as stream:
        out = await _read_all(stream)
        assert await asyncio.wait_for(stream.wait(), STEP_S) == 0
        exec_state = await asyncio.to_thread(docker._docker().api.exec_inspect, stream.exec_id)
    environ = out["stdout"].split(b"\0")
    assert f"API_KEY={secret}".encode() in environ
    assert b"PODBAY_RUN=r9" in environ

    proc = await asyncio.create_subprocess_exec(
        "docker", "inspect", name, stdout=asyncio.subprocess.PIPE
    )
    inspected, _ = await asyncio.wait_for(proc.communicate(), STEP_S)
    assert proc.returncode == 0
    assert name.encode() in inspected
    assert secret.encode() not in inspected
    assert secret not in repr(exec_state)  # nor in the exec's own record


async def test_exec_runs_as_the_container_user_in_the_workspace(dh: DockerHarness) -> None:
    docker, name, user = await _project(dh, "whoami")
    async with await docker.exec_stream(
        name, ["sh", "-c", "id -u; id -g; pwd"], user=user, env={}, tag="run-id"
    ) as stream:
        out = await _read_all(stream)
        assert await asyncio.wait_for(stream.wait(), STEP_S) == 0
    uid, gid = dev_ids()
    assert out["stdout"].decode().split() == [str(uid), str(gid), "/workspace"]
    assert out["stderr"] == b""
