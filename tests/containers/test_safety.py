"""Projects never share a source, never run container-written code on the host, never follow
a swapped-in symlink, get limits Docker accepts, and keep URL passwords out of the store."""

from __future__ import annotations

import asyncio
import base64
import http.server
import os
import secrets
import shutil
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from docker_support import DM, DockerHarness

from podbay.engine.jobs import JobHandle
from podbay.engine.lifecycle import NewProjectRequest
from podbay.errors import UserError


async def outcome(dh: DockerHarness, name: str, timeout: float = 300) -> str:
    """The final reply of `new project <name>`: ready, failed or refused."""
    found: list[str] = []

    def done() -> bool:
        found[:] = [
            t
            for t in dh.transport.texts(DM)
            if t.startswith(f"**{name}** is ready")
            or f"new project {name} failed" in t
            or t.startswith(f"Cannot create `{name}`")
        ]
        return bool(found)

    await dh.transport.wait_for(done, timeout, what=f"the outcome of {name}")
    return found[0]


async def _create_directly(dh: DockerHarness, plan: object, name: str = "racy") -> None:
    """The job of `new project`, without the dispatcher in between (to order events)."""
    job_id = await dh.store.job_create(name, "new project", session=None, requested_by="t")

    async def notify(text: str) -> None:
        pass

    handle = JobHandle(dh.store, job_id, name, notify)

    async def progress(text: str) -> None:
        pass

    await dh.manager.create(plan, handle, progress)  # type: ignore[arg-type]


# -- item 1: one source directory per project ---------------------------------------------


async def test_two_projects_asked_at_once_cannot_share_one_source_directory(
    dh: DockerHarness,
) -> None:
    shared = dh.projects_root / "shared"
    await dh.say(f"new project ra --path {shared}")
    await dh.say(f"new project rb --path {shared}")
    assert "is ready" in await outcome(dh, "ra")
    refused = await outcome(dh, "rb")
    assert "is ready" not in refused
    assert f"`{shared}` is already the source of project `ra`" in refused
    await dh.dispatcher.drain()
    assert [p.name for p in await dh.store.project_list()] == ["ra"]
    assert len(await dh.manager.managed_containers()) == 1


async def test_a_path_inside_or_above_another_projects_source_is_refused(
    dh: DockerHarness,
) -> None:
    outer = dh.projects_root / "outer"
    inner = outer / "inner"
    await dh.say(f"new project deep --path {inner}")
    await dh.say(f"new project wide --path {outer}")
    await dh.say(f"new project deeper --path {inner / 'more'}")
    assert "is ready" in await outcome(dh, "deep")
    wide = await outcome(dh, "wide")
    assert f"`{outer}` contains the source of project `deep`" in wide
    deeper = await outcome(dh, "deeper")
    assert f"`{inner / 'more'}` is inside the source of project `deep`" in deeper
    await dh.dispatcher.drain()
    assert [p.name for p in await dh.store.project_list()] == ["deep"]
    assert (inner / ".git").is_dir()


async def test_a_failed_project_never_empties_another_projects_source(
    dh: DockerHarness,
) -> None:
    shared = dh.projects_root / "y"
    await dh.say(f"new project rc --path {shared}")
    await dh.say(f"new project rd --path {shared} --memory 1b")
    assert "is ready" in await outcome(dh, "rc")
    await dh.transport.wait_for_text("--memory", session=DM, timeout=60)
    await dh.dispatcher.drain()
    assert (shared / ".git").is_dir(), "rc's repository must survive rd"
    assert shared.stat().st_uid != 0 or os.getuid() != 0
    assert [p.name for p in await dh.store.project_list()] == ["rc"]


# -- item 19: ports are reserved atomically -------------------------------------------------


async def test_two_projects_created_at_once_get_different_ssh_ports(dh: DockerHarness) -> None:
    plans = [
        await dh.manager.plan(NewProjectRequest(name=n, requested_by="memory:alice"))
        for n in ("p1", "p2")
    ]
    # Both jobs run at once: neither may take the port the other was given.
    await asyncio.gather(*(_create_directly(dh, plan, plan.request.name) for plan in plans))
    rows = await dh.store.project_list()
    assert [r.state for r in rows] == ["ready", "ready"]
    ports = {r.ssh_port for r in rows}
    assert len(ports) == 2 and None not in ports


async def test_a_plan_that_is_not_started_releases_its_reservation(dh: DockerHarness) -> None:
    request = NewProjectRequest(name="held", requested_by="memory:alice")
    plan = await dh.manager.plan(request)
    row = await dh.store.project_get("held")
    assert row is not None and row.state == "creating" and row.ssh_port == plan.ssh_port
    # The periodic reconciler must leave a live reservation alone.
    from podbay.engine.reconcile import Reconciler

    async def notify(session: object, text: str) -> None:
        raise AssertionError(text)

    assert await Reconciler(dh.manager, notify, lambda p: False).run_once() == []
    assert await dh.store.project_get("held") is not None
    await dh.manager.release(plan)
    assert await dh.store.project_get("held") is None
    assert await dh.store.ports_in_use() == set()
    assert not plan.path.exists()


async def test_a_reservation_left_by_a_crash_is_rolled_back_at_the_next_start(
    dh: DockerHarness,
) -> None:
    from podbay.engine.lifecycle import ProjectManager
    from podbay.engine.reconcile import Reconciler

    folder = dh.projects_root / "mine-already"
    folder.mkdir()
    (folder / "keep.txt").write_text("not podbay's")
    await dh.manager.plan(NewProjectRequest(name="crashed", requested_by="memory:alice"))
    # A new process (a fresh manager on the same database) finds the 'creating' row.
    restarted = ProjectManager(dh.store, dh.settings, dh.manager.docker)

    async def notify(session: object, text: str) -> None:
        raise AssertionError(text)

    actions = await Reconciler(restarted, notify, lambda p: False).run_once()
    assert actions == ["rolled back half-created crashed"]
    assert await dh.store.project_list() == []
    assert (folder / "keep.txt").read_text() == "not podbay's"
    assert sorted(p.name for p in dh.projects_root.iterdir()) == ["mine-already"]


# -- item 4: no host git on container-writable trees ----------------------------------------


async def test_status_of_a_project_never_runs_git_config_from_the_container_on_the_host(
    dh: DockerHarness,
) -> None:
    await dh.ask("new project sneaky", "is ready")
    row = await dh.store.project_get("sneaky")
    assert row is not None
    marker = Path(f"/tmp/pwned-{secrets.token_hex(4)}")
    # The container can write its .git/config; here the test does it, as the container could.
    config = Path(row.path) / ".git" / "config"
    config.write_text(
        config.read_text() + f"[core]\n\tfsmonitor = touch {marker}\n\tpager = touch {marker}\n"
    )
    Path(row.path, "a.txt").write_text("dirty")
    try:
        text = await dh.ask("status sneaky", "**sneaky**", timeout=60)
        assert not marker.exists(), "a container-written fsmonitor ran on the host"
        assert "git: branch " in text and " uncommitted" in text
        # It is the container's own code, and it ran there, as dev.
        ran = await dh.manager.docker.exec_run(
            dh.manager.container_name("sneaky"), ["test", "-e", str(marker)], user="dev"
        )
        assert ran.exit_code == 0
    finally:
        marker.unlink(missing_ok=True)


async def test_status_of_a_stopped_project_says_git_state_is_unavailable(
    dh: DockerHarness,
) -> None:
    await dh.ask("new project sleepy", "is ready")
    await dh.manager.docker.stop(dh.manager.container_name("sleepy"), grace_s=1)
    text = await dh.ask("status sleepy", "**sleepy**", timeout=60)
    assert "git: unknown (the container is not running" in text


async def test_exec_runs_as_dev_in_the_workspace_and_times_out(dh: DockerHarness) -> None:
    await dh.ask("new project execs", "is ready")
    name = dh.manager.container_name("execs")
    result = await dh.manager.docker.exec_run(
        name, ["sh", "-c", "id -un; pwd; echo err >&2; exit 3"], user="dev", timeout_s=30
    )
    assert (result.exit_code, result.timed_out) == (3, False)
    assert result.stdout.splitlines() == ["dev", "/workspace"]
    assert result.stderr.strip() == "err"
    slow = await dh.manager.docker.exec_run(name, ["sleep", "30"], user="dev", timeout_s=1)
    assert slow.timed_out


# -- item 5: the --path symlink race -----------------------------------------------------------


@pytest.mark.parametrize("existed", [False, True])
async def test_a_path_swapped_for_a_symlink_after_planning_is_refused_and_untouched(
    dh: DockerHarness, tmp_path: Path, existed: bool
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret.txt").write_text("host data")
    target = dh.projects_root / "racy"
    if existed:
        target.mkdir()
    plan = await dh.manager.plan(
        NewProjectRequest(name="racy", requested_by="memory:alice", path=str(target))
    )
    # Between the check and the creation, someone puts a link where the folder goes.
    if existed:
        target.rmdir()
    target.symlink_to(victim)
    with pytest.raises(UserError, match="changed since it was checked"):
        await _create_directly(dh, plan)
    assert sorted(p.name for p in victim.iterdir()) == ["secret.txt"]
    assert victim.stat().st_uid == os.getuid()
    assert (victim / "secret.txt").stat().st_uid == os.getuid()
    assert target.is_symlink(), "rollback must not remove what it did not create"
    assert await dh.store.project_get("racy") is None
    assert await dh.manager.managed_containers() == []


# -- item 20: resource limits ------------------------------------------------------------------


@pytest.mark.parametrize("docker_options", [{"cpus": 512.0}])
async def test_a_default_cpu_limit_above_the_hosts_cpus_is_clamped_and_said(
    dh: DockerHarness,
) -> None:
    host_cpus = (await dh.manager.docker.engine_info()).cpus
    reply = await dh.ask("new project clamped", "is ready")
    assert f"docker.cpus = 512 is more than this Docker engine's {host_cpus} CPUs" in "\n".join(
        dh.transport.texts(DM)
    )
    attrs = await dh.manager.docker.inspect_raw(dh.manager.container_name("clamped"))
    assert attrs["HostConfig"]["NanoCpus"] == host_cpus * 1_000_000_000
    assert "is ready" in reply


# -- item 8: passwords in git URLs -------------------------------------------------------------


@pytest.fixture
async def https_git_server(tmp_path: Path) -> AsyncIterator[tuple[str, list[str], Path]]:
    """A dumb-protocol git server over HTTPS on 127.0.0.1 that demands basic auth."""
    serving = await asyncio.to_thread(_serve_git_over_https, tmp_path)
    url, seen, cert, server, thread = serving
    try:
        yield url, seen, cert
    finally:

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join()

        await asyncio.to_thread(stop)


def _serve_git_over_https(
    tmp_path: Path,
) -> tuple[str, list[str], Path, http.server.ThreadingHTTPServer, threading.Thread]:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "README.md").write_text("from https\n")
    git = ["git", "-c", "user.name=T", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(seed)], check=True)
    subprocess.run([*git, "-C", str(seed), "add", "."], check=True)
    subprocess.run([*git, "-C", str(seed), "commit", "-qm", "seed"], check=True)
    served = tmp_path / "served"
    served.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(served / "r.git")], check=True)
    subprocess.run(["git", "-C", str(served / "r.git"), "update-server-info"], check=True)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    password = "PASS" + secrets.token_hex(6)
    expected = "Basic " + base64.b64encode(f"user:{password}".encode()).decode()
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(served), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            auth = self.headers.get("Authorization", "")
            seen.append(auth)
            if auth != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    return f"https://user:{password}@127.0.0.1:{port}/r.git", seen, cert, server, thread


async def test_a_password_in_a_git_url_moves_to_the_credentials_file(
    dh: DockerHarness,
    https_git_server: tuple[str, list[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, seen, cert = https_git_server
    monkeypatch.setenv("GIT_SSL_CAINFO", str(cert))
    password = url.split(":")[2].split("@")[0]
    clean = url.replace(f"user:{password}@", "")
    reply = await dh.ask(f"new project private --git {url}", "is ready", timeout=300)
    row = await dh.store.project_get("private")
    assert row is not None
    assert (Path(row.path) / "README.md").read_text() == "from https\n"
    assert any(s.startswith("Basic ") for s in seen), "the clone authenticated"
    assert row.git_url == clean
    origin = (
        await asyncio.to_thread(
            subprocess.run,
            ["git", "config", "--file", str(Path(row.path, ".git", "config")), "remote.origin.url"],
            capture_output=True,
            text=True,
            check=True,
        )
    ).stdout.strip()
    assert origin == clean
    creds = dh.manager.secrets_dir("private") / "git-credentials"
    assert oct(creds.stat().st_mode & 0o777) == "0o600"
    assert creds.read_text() == f"{url.rsplit('/', 1)[0]}\n"
    assert "Password from the git URL stored" in reply
    assert all(password not in t for t in dh.transport.texts())
    for table, column in [("projects", "git_url"), ("projects", "settings"), ("jobs", "steps")]:
        cursor = await dh.store._db.execute(f"SELECT {column} FROM {table}")  # type: ignore[attr-defined]
        assert all(password not in str(r[0]) for r in await cursor.fetchall())
    attrs = await dh.manager.docker.inspect_raw(dh.manager.container_name("private"))
    assert password not in repr(attrs)
    assert shutil.which("git")
