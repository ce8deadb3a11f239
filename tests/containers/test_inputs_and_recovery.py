"""Bad input creates nothing; clones work; a crash mid-creation is reconciled."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from docker_support import DockerHarness, ca_toml, container_settings, remove_instance_containers
from fakes.podbay_cli import chat, crash, start_podbay

from podbay.engine.lifecycle import instance_id


async def assert_nothing_created(dh: DockerHarness, before: set[str]) -> None:
    assert await dh.store.project_list() == []
    assert await dh.store.ports_in_use() == set()
    assert await dh.manager.managed_containers() == []
    assert {p.name for p in dh.projects_root.iterdir()} == before
    keys = dh.settings.data_dir / "keys"
    assert not keys.exists() or list(keys.iterdir()) == []


BAD_INPUTS = [
    ("new project Bad_Name", "Invalid project name"),
    ("new project -x", "unknown option -x"),
    ("new project ok --stack cobol", "Unknown stack 'cobol'"),
    ("new project ok --git file:///etc/passwd", "Unsupported git URL"),
    ("new project ok --git 'ext::sh -c touch% /tmp/pwned'", "Unsupported git URL"),
    ("new project ok --git=-uhttps://example.org/x", "must not start with '-'"),
    ("new project ok --git /srv/repo.git", "Unsupported git URL"),
    ("new project ok --git ../repo", "Unsupported git URL"),
    ("new project ok --path relative/dir", "must be absolute"),
    ("new project ok --path /etc/podbay-nope", "outside the allowed project roots"),
    ("new project ok --path {root}/full", "not an empty directory"),
    ("new project ok --path {root}/../escape", "outside the allowed project roots"),
    ("new project ok --cpus many", "--cpus takes a positive number"),
    ("new project ok --cpus -1", "--cpus takes a positive number"),
    ("new project ok --memory lots", "--memory takes a size"),
    ("new project ok --memory 0", "--memory must be at least 6m"),
    ("new project ok --memory 1b", "--memory must be at least 6m"),
    (
        "new project ok --memory 99999999999999999999g",
        "--memory 99999999999999999999g is too large",
    ),
    ("new project ok --cpus 256", "this Docker engine has only"),
    ("new project ok --cpus 0.0001", "--cpus must be at least 0.01"),
    ("new project ok --git https://u:p@h/x.git --token abc", "not both"),
    ("new project ok --token", "--token needs a value"),
]


@pytest.mark.parametrize(("command", "error"), BAD_INPUTS)
async def test_bad_input_gets_a_clear_error_and_creates_nothing(
    dh: DockerHarness, command: str, error: str
) -> None:
    full = dh.projects_root / "full"
    full.mkdir()
    (full / "existing.txt").write_text("mine")
    before = {p.name for p in dh.projects_root.iterdir()}
    reply = await dh.ask(command.format(root=dh.projects_root), error)
    assert "is ready" not in reply
    await dh.dispatcher.drain()
    await assert_nothing_created(dh, before)
    assert (full / "existing.txt").read_text() == "mine"


async def test_a_duplicate_name_is_refused(dh: DockerHarness) -> None:
    await dh.ask("new project twin", "is ready")
    await dh.ask("new project twin", "already exists")
    assert len(await dh.manager.managed_containers()) == 1


async def test_failure_midway_rolls_everything_back(dh: DockerHarness) -> None:
    before = {p.name for p in dh.projects_root.iterdir()}
    # Port 1 refuses connections: the clone fails after row, port, keys and dir exist.
    reply = await dh.ask(
        "new project ghost --git ssh://dev@127.0.0.1:1/nowhere.git", "failed", timeout=120
    )
    assert "new project ghost failed: git clone failed" in reply
    assert "Connection refused" in reply
    await dh.dispatcher.drain()
    await assert_nothing_created(dh, before)
    jobs = await dh.store._db.execute(  # type: ignore[attr-defined]
        "SELECT kind, status FROM jobs"
    )
    assert [tuple(r) for r in await jobs.fetchall()] == [("new project", "failed")]


async def test_clone_over_ssh_brings_the_content_and_detects_the_stack(
    dh: DockerHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real sshd on loopback serves the bare repository: another podbay project.
    await dh.ask("new project gitsrv", "is ready")
    server = await dh.store.project_get("gitsrv")
    assert server is not None and server.ssh_port is not None
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "pyproject.toml").write_text("[project]\nname = 'seeded'\n")
    (seed / "requirements.txt").write_text("")
    (seed / "app.py").write_text("print('hi')\n")

    def make_repo() -> None:
        git = ["git", "-c", "user.name=T", "-c", "user.email=t@example.org"]
        subprocess.run([*git, "init", "-q", "-b", "main", str(seed)], check=True)
        subprocess.run([*git, "-C", str(seed), "add", "."], check=True)
        subprocess.run([*git, "-C", str(seed), "commit", "-qm", "seed"], check=True)
        bare = Path(server.path) / "seed.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(bare)], check=True)
        if os.getuid() == 0:
            subprocess.run(["chown", "-R", "1000:1000", str(bare)], check=True)

    await asyncio.to_thread(make_repo)
    key = dh.manager.key_path("gitsrv")
    monkeypatch.setenv(
        "GIT_SSH_COMMAND",
        f"ssh -i {key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
        "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
    )
    url = f"ssh://dev@127.0.0.1:{server.ssh_port}/workspace/seed.git"
    reply = await dh.ask(f"new project cloned --git {url}", "is ready", timeout=600)
    assert "python (detected from pyproject.toml, requirements*.txt, *.py)" in reply
    cloned = await dh.store.project_get("cloned")
    assert cloned is not None and cloned.stack == "python" and cloned.git_url == url
    assert (Path(cloned.path) / "app.py").read_text() == "print('hi')\n"


def test_kill_9_during_new_project_is_reconciled_at_the_next_start(
    docker_engine: None, tmp_path: Path
) -> None:
    settings = container_settings(
        tmp_path, stacks_dirs=[Path(__file__).parent / "stacks"], ready_timeout_s=300
    )
    (tmp_path / "projects").mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[access]
admins = ["console:*"]
[projects]
root = "{tmp_path / "projects"}"
[docker]
network = "host"
name_prefix = "{settings.docker.name_prefix}"
stacks_dirs = ["{Path(__file__).parent / "stacks"}"]
ready_timeout_s = 300
"""
        + ca_toml()
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
    env |= {"PODBAY_CONFIG": str(config), "PODBAY_DATA_DIR": str(settings.data_dir)}
    instance = instance_id(settings.data_dir)
    db = settings.data_dir / "podbay.db"
    proc = start_podbay(env)
    try:
        assert proc.stdin is not None
        proc.stdin.write("new project crashy --stack slowstart\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 600
        while not _containers(instance):
            assert proc.poll() is None, "podbay exited early"
            assert time.monotonic() < deadline, "the container never appeared"
            time.sleep(0.2)
        crash(proc)
        # The crash left a container, a 'creating' row holding a port, keys and a directory.
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT name, state, ssh_port FROM projects").fetchall()
        assert [(n, s) for n, s, _ in rows] == [("crashy", "creating")]
        assert (settings.data_dir / "keys" / "crashy").exists()

        result = chat(env, "status\n", timeout=300)
        assert result.returncode == 0, result.stderr
        assert "podbay restarted during new project of crashy" in result.stdout
        assert "Projects: none yet" in result.stdout
        assert _containers(instance) == []
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM projects").fetchone() == (0,)
        assert not (settings.data_dir / "keys" / "crashy").exists()
        assert not (tmp_path / "projects" / "crashy").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        remove_instance_containers(instance, settings)


def _containers(instance: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=podbay.instance={instance}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


FAILING_STACK = Path(__file__).parent / "failing-stacks"


@pytest.mark.parametrize("docker_options", [{"stacks_dirs": [FAILING_STACK]}])
async def test_a_failed_image_build_quotes_its_last_lines_and_creates_nothing(
    dh: DockerHarness,
) -> None:
    before = {p.name for p in dh.projects_root.iterdir()}
    reply = await dh.ask("new project broken --stack broken", "Image build failed", timeout=300)
    assert "line 29 of the failing step" in reply
    assert "line 5 of the failing step" not in reply  # only the last 20 lines are quoted
    await dh.dispatcher.drain()
    await assert_nothing_created(dh, before)


async def test_a_dead_container_is_reported_once_to_the_sessions_using_it(
    dh: DockerHarness,
) -> None:
    from podbay.engine.reconcile import Reconciler

    await dh.ask("new project fragile", "is ready")
    name = dh.manager.container_name("fragile")
    await asyncio.to_thread(
        subprocess.run, ["docker", "stop", "-t", "1", name], check=True, capture_output=True
    )
    told: list[str] = []

    async def notify(session: object, text: str) -> None:
        told.append(f"{session} {text}")

    reconciler = Reconciler(dh.manager, notify, lambda project: False)
    (action,) = await reconciler.run_once()
    assert action.startswith("fragile: its container is exited(")
    assert await reconciler.run_once() == []
    assert len(told) == 1 and told[0].startswith("memory:dm-alice ⚠ Project `fragile`")
    assert await dh.manager.docker.inspect(name) is not None, "reported, never deleted"


async def test_a_users_empty_directory_survives_a_failed_creation_empty(
    dh: DockerHarness,
) -> None:
    mine = dh.projects_root / "mine"
    mine.mkdir()
    await dh.ask(
        f"new project ghost --path {mine} --git ssh://dev@127.0.0.1:1/nowhere.git",
        "failed",
        timeout=120,
    )
    await dh.dispatcher.drain()
    assert mine.is_dir() and list(mine.iterdir()) == []
    assert await dh.store.project_list() == []
