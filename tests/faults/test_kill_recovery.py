"""kill -9 of the real `podbay run` in the middle of work, then a restart.

Three moments: a freeform agent run (with a message queued behind it), `new project` after
its container exists but before it is ready, and `delete` while the container is being
stopped. After the restart nothing podbay started is left running, no message is lost or
handled twice, each conversation is told what was cut short, and the same command works.

The moments are found by events, not by timing: the agent connects to a socket when it
runs, and the Docker engine's event stream says when the container was started or is being
stopped. The container tests use the real engine (as tests/containers do; `./scripts/test`
starts it) and FAIL when it is missing.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_support_kill import (
    ContainerEvents,
    LivePodbay,
    Signal,
    instance_containers,
    local_ca_certs,
    podbay_env,
    query,
    remove_instance,
    tagged_processes,
    toml_list,
    volume_names,
)
from test_process_recovery import alive, wait_gone

from podbay.engine.lifecycle import instance_id

# -- a freeform run ---------------------------------------------------------------------------

# Logs every prompt it is given (one JSON line per run). Asked to refactor, it starts a
# helper (as agents start test runners and servers), says so on the test's socket, and
# waits for the helper, which never ends.
AGENT = """
import json, os, socket, subprocess, sys
prompt = sys.stdin.read()
with open({prompts!r}, 'a') as out:
    out.write(json.dumps(prompt) + '\\n')
if 'refactor' in prompt:
    helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])
    tag = os.environ.get('PODBAY_PROCESS', '-')
    with socket.create_connection(('127.0.0.1', {port})) as conn:
        conn.sendall(f'{{os.getpid()}} {{helper.pid}} {{tag}}'.encode())
    helper.wait()
print('(agent) done with: ' + ' '.join(prompt.split()))
"""


def freeform(db: Path) -> list[tuple[object, ...]]:
    """(text, status) of each freeform message podbay received, in order."""
    return query(db, "SELECT text, status FROM inbox WHERE kind = 'freeform' ORDER BY id")


def test_kill_9_during_a_freeform_run_loses_and_repeats_nothing(tmp_path: Path) -> None:
    running = Signal()
    prompts = tmp_path / "prompts.jsonl"
    script = tmp_path / "agent.py"
    script.write_text(AGENT.format(prompts=str(prompts), port=running.port))
    config = (
        f'[agent]\ncommand = ["{sys.executable}", "{script}"]\n'
        "[dispatcher]\ncoalesce_window_ms = 200\n"
    )
    env = podbay_env(tmp_path, config)
    db = tmp_path / "data" / "podbay.db"
    # Every process podbay starts carries PODBAY_PROCESS=podbay-<instance>.<record>.<time>.
    scope = f"podbay-{instance_id(tmp_path / 'data')}."
    helper = 0
    try:
        with LivePodbay(env, tmp_path / "first.log") as first:
            first.say("please refactor everything")
            leader_s, helper_s, tag = running.receive(timeout=60).split()
            leader, helper = int(leader_s), int(helper_s)
            assert tag.startswith(scope), tag
            # A second message waits behind the run: it is in the inbox, taken by no run.
            since = first.say("and then add tests")
            first.say("status")
            # The front lane handles one message after the other: once whoami is answered,
            # status has been answered and recorded as done.
            first.say("whoami")
            first.wait_for("Queues: console:local 1", since=since)
            first.wait_for("You are console:", since=since)
            first.crash()

        wait_gone(leader)  # PR_SET_PDEATHSIG ended the agent with podbay
        assert alive(helper), "nothing outlived podbay: this test would prove nothing"
        assert freeform(db) == [
            ("please refactor everything", "processing"),
            ("and then add tests", "processing"),
        ]

        with LivePodbay(env, tmp_path / "second.log") as second:
            # (The recovery notices are whole lines, the queued message's comes last.)
            told = second.wait_for("and then add tests")
            # No orphan: the helper that outlived the crash was killed at start-up.
            assert not alive(helper), "the previous run's helper still runs"
            assert tagged_processes(scope) == {}
            assert f"stopped what was still running from before: agent (pid {leader})" in told
            assert "podbay restarted while working on: please refactor everything (run #1)" in told
            # The queued message is reported as cut short as well (it belonged to no run);
            # the command answered before the crash is not.
            (queued,) = [line for line in told.splitlines() if "and then add tests" in line]
            assert queued.startswith("podbay restarted while working on: and then add tests")
            assert "status" not in queued, queued
            assert freeform(db) == [
                ("please refactor everything", "interrupted"),
                ("and then add tests", "interrupted"),
            ]

            since = second.say("write the changelog")
            second.wait_for("(agent) done with: write the changelog", since=since)
            assert second.finish() == 0
            assert "Traceback" not in second.output() + second.log_tail(200)

        # Each message reached the agent at most once: the interrupted ones are not
        # replayed behind the user's back, the new one ran once.
        given = prompts.read_text().splitlines()
        assert len(given) == 2, given
        assert "please refactor everything" in given[0]
        assert "write the changelog" in given[1] and "add tests" not in given[1]
        assert query(db, "SELECT status FROM runs ORDER BY id") == [
            ("interrupted",),
            ("succeeded",),
        ]
        assert query(db, "SELECT status FROM inbox WHERE text = 'write the changelog'") == [
            ("done",)
        ]
        assert tagged_processes(scope) == {}, "a process of podbay outlived its clean exit"
    finally:
        running.close()
        if helper and alive(helper):
            os.kill(helper, signal.SIGKILL)


# -- projects on the real Docker engine ---------------------------------------------------------

SLOWSTART = Path(__file__).resolve().parents[1] / "containers" / "stacks"


@pytest.fixture
def docker_ready() -> None:
    from docker.client import DockerClient

    try:
        client = DockerClient.from_env(timeout=10)
        client.ping()
        client.images.get("debian:bookworm-slim")
    except Exception as exc:
        pytest.fail(
            f"Docker engine or base image not available ({exc}); run ./scripts/ensure-docker "
            "(./scripts/test does this) — container tests must run, not skip."
        )
    client.close()


class World:
    """One podbay data dir and projects root on the real engine, cleaned up afterwards."""

    def __init__(self, tmp_path: Path, stacks: list[Path]) -> None:
        self.tmp_path = tmp_path
        self.projects = tmp_path / "projects"
        self.projects.mkdir()
        self.data = tmp_path / "data"
        self.db = self.data / "podbay.db"
        self.prefix = f"pbf{os.urandom(3).hex()}-"
        self.instance = instance_id(self.data)
        config = f"""
[access]
admins = ["console:*"]
[projects]
root = "{self.projects}"
[docker]
network = "host"
name_prefix = "{self.prefix}"
ready_timeout_s = 300
reconcile_interval_s = 3600
stats_interval_s = 3600
stacks_dirs = {toml_list(stacks)}
extra_ca_certs = {toml_list(local_ca_certs())}
[git]
user_name = "Test Dev"
user_email = "dev@example.org"
"""
        self.env = podbay_env(tmp_path, config)
        self.events = ContainerEvents(self.instance)
        self._started = 0

    def podbay(self) -> LivePodbay:
        self._started += 1
        return LivePodbay(self.env, self.tmp_path / f"podbay-{self._started}.log")

    def containers(self) -> list[str]:
        return sorted(c.name for c in instance_containers(self.instance))

    def project_rows(self) -> list[tuple[str, str, int]]:
        return query(self.db, "SELECT name, state, ssh_port FROM projects ORDER BY name")

    def close(self) -> None:
        self.events.close()
        remove_instance(self.instance, self.prefix)


@pytest.fixture
def world(docker_ready: None, tmp_path: Path) -> Iterator[World]:
    stacks = tmp_path / "stacks"
    # A container that takes its whole stop grace (10 s) to stop: sshd ignores SIGWINCH.
    # It makes the moment "delete is stopping the container" last long enough to hit.
    (stacks / "slowstop").mkdir(parents=True)
    (stacks / "slowstop" / "Dockerfile.fragment").write_text("STOPSIGNAL SIGWINCH\n")
    (stacks / "slowstop" / "markers").write_text("slowstop.marker\n")
    made = World(tmp_path, [SLOWSTART, stacks])
    try:
        yield made
    finally:
        made.close()


def test_kill_9_during_new_project_is_rolled_back_and_the_name_works_again(
    world: World,
) -> None:
    with world.podbay() as first:
        # slowstart: sshd starts two minutes late, so podbay waits for readiness.
        first.say("new project crashy --stack slowstart")
        world.events.wait_for(
            "start", "crashy", timeout=600, alive=lambda: first.proc.poll() is None
        )
        first.crash()

    # The crash left a started container and a 'creating' row holding a port.
    assert world.containers() == [f"{world.prefix}crashy"]
    ((name, state, port),) = world.project_rows()
    assert (name, state) == ("crashy", "creating")
    assert (world.data / "keys" / "crashy").is_dir()
    assert (world.projects / "crashy" / ".git").is_dir()

    with world.podbay() as second:
        told = second.wait_for("podbay restarted during new project of crashy")
        # The first reconcile pass ran before the notice: everything is rolled back.
        world.events.wait_for("destroy", "crashy", timeout=10)
        assert world.containers() == []
        assert [v for v in volume_names(world.prefix) if "crashy" in v] == []
        assert world.project_rows() == []
        assert not (world.data / "keys" / "crashy").exists()
        assert not (world.projects / "crashy").exists(), "the folder podbay made is removed"
        # The port went back, recorded as used (handed out again only after fresh ones).
        assert query(world.db, "SELECT port FROM ports_released") == [(port,)]
        assert query(world.db, "SELECT kind, status FROM jobs") == [("new project", "interrupted")]
        assert "check status and retry if needed" in told

        since = second.say("new project crashy")
        ready = second.wait_for("crashy is ready", since=since, timeout=600)
        assert "failed" not in ready, ready
        ((name, state, new_port),) = world.project_rows()
        assert (name, state) == ("crashy", "ready")
        assert new_port != port
        assert world.containers() == [f"{world.prefix}crashy"]
        # The first attempt was not run again behind the user's back.
        assert query(world.db, "SELECT kind, status FROM jobs ORDER BY id") == [
            ("new project", "interrupted"),
            ("new project", "succeeded"),
        ]
        assert second.finish() == 0


def test_kill_9_while_delete_stops_the_container_leaves_a_delete_that_completes(
    world: World,
) -> None:
    with world.podbay() as first:
        since = first.say("new project doomed --stack slowstop")
        first.wait_for("doomed is ready", since=since, timeout=600)
        ((_, _, port),) = world.project_rows()
        source = world.projects / "doomed"
        (source / "notes.txt").write_text("my work\n")
        since = first.say("delete doomed")
        first.wait_for("confirm", since=since)
        first.say("confirm")
        # docker stop has sent the stop signal: the container is being removed.
        world.events.wait_for(
            "kill", "doomed", timeout=120, alive=lambda: first.proc.poll() is None
        )
        first.crash()

    # Cut short mid-removal: the project is still registered.
    assert [(n, s) for n, s, _ in world.project_rows()] == [("doomed", "ready")]

    with world.podbay() as second:
        told = second.wait_for("podbay restarted during delete of doomed")
        assert "check status and retry if needed" in told
        # Consistent in the meantime: whatever container is left belongs to a registered
        # project (no orphan), and status shows the project.
        registered = {f"{world.prefix}{n}" for n, _, _ in world.project_rows()}
        assert set(world.containers()) <= registered
        since = second.say("status")
        assert "doomed" in second.wait_for("Runs:", since=since)

        since = second.say("delete doomed")
        second.wait_for("confirm", since=since)
        since = second.say("confirm")
        done = second.wait_for("Deleted doomed", since=since, timeout=120)
        assert f"Source kept at {source}" in done, done
        assert world.containers() == []
        assert volume_names(world.prefix) == []
        assert world.project_rows() == []
        assert not (world.data / "keys" / "doomed").exists()
        assert (source / "notes.txt").read_text() == "my work\n"
        assert (port,) in query(world.db, "SELECT port FROM ports_released")
        assert query(world.db, "SELECT kind, status FROM jobs ORDER BY id") == [
            ("new project", "succeeded"),
            ("delete", "interrupted"),
            ("delete", "succeeded"),
        ]
        assert second.finish() == 0
