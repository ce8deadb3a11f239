"""Start-up polish: absolute paths, a read-only `status`, quiet third-party logs, rotation."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from podbay.cli import _setup_logging, main
from podbay.commands.status import render_status
from podbay.config import load_settings
from podbay.engine.core import StatusReport
from podbay.engine.docker import ContainerInfo
from podbay.engine.lifecycle import ContainerStats
from podbay.engine.store import MIGRATIONS, ProjectRow, Store
from podbay.errors import StoreError
from podbay.messages import SessionKey


def _env(tmp_path: Path, config: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
    env["HOME"] = str(tmp_path / "home")
    env["PODBAY_DATA_DIR"] = str(tmp_path / "data")
    path = tmp_path / "config.toml"
    path.write_text(config)
    env["PODBAY_CONFIG"] = str(path)
    return env


def _podbay(
    tmp_path: Path, *args: str, stdin: str = "", cwd: Path | None = None, config: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "podbay", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(tmp_path, config),
        cwd=cwd,
        timeout=120,
        check=False,
    )


# -- paths ---------------------------------------------------------------------------


def test_relative_data_dir_and_configured_paths_become_absolute_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("PODBAY_"):
            monkeypatch.delenv(name)
    config = tmp_path / "config.toml"
    config.write_text(
        '[projects]\nroot = "src"\nallowed_roots = ["src", "../elsewhere"]\n'
        '[docker]\nstacks_dirs = ["stacks"]\nextra_ca_certs = ["certs/proxy.pem"]\n'
    )
    settings, _ = load_settings(config, data_dir=Path("reldata"))
    assert settings.data_dir == tmp_path / "reldata"
    assert settings.projects.root == tmp_path / "src"
    assert settings.projects.allowed_roots == [tmp_path / "src", tmp_path.parent / "elsewhere"]
    assert settings.docker.stacks_dirs == [tmp_path / "stacks"]
    assert settings.docker.extra_ca_certs == [tmp_path / "certs" / "proxy.pem"]
    monkeypatch.setenv("PODBAY_DATA_DIR", "fromenv")
    settings, _ = load_settings(config)
    assert settings.data_dir == tmp_path / "fromenv"
    # Once resolved, a later change of directory changes nothing.
    monkeypatch.chdir(tmp_path.parent)
    assert settings.data_dir == tmp_path / "fromenv"


def test_chat_with_a_relative_data_dir_keeps_its_data_there(tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    result = _podbay(tmp_path, "--data-dir", "reldata", "chat", stdin="whoami\n", cwd=work)
    assert result.returncode == 0, result.stderr
    assert (work / "reldata" / "podbay.db").exists()


# -- a read-only status ---------------------------------------------------------------


def _fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_status_answers_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    assert _podbay(tmp_path, "chat", stdin="whoami\n").returncode == 0
    db = tmp_path / "data" / "podbay.db"
    before = _fingerprint(db)
    # A running podbay in the middle of a write: readers of a WAL database are not blocked.
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        status = _podbay(tmp_path, "status")
        assert status.returncode == 0, status.stderr
        assert "Projects" in status.stdout
        writer.execute("ROLLBACK")
    finally:
        writer.close()
    assert _fingerprint(db) == before


async def test_read_only_store_reads_and_refuses_every_write(tmp_path: Path) -> None:
    path = tmp_path / "podbay.db"
    async with await Store.open(path) as store:
        await store.session_set_verbose(SessionKey("console", "me"), 2)
    before = _fingerprint(path)
    async with await Store.open(path, read_only=True) as store:
        assert (await store.session_get(SessionKey("console", "me"))).verbose == 2
        assert await store.schema_version() == len(MIGRATIONS)
        with pytest.raises(StoreError, match="read-only"):
            await store.session_set_verbose(SessionKey("console", "me"), 0)
    assert _fingerprint(path) == before


async def test_read_only_store_never_creates_a_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        await Store.open(tmp_path / "missing" / "podbay.db", read_only=True)
    assert not (tmp_path / "missing").exists()


async def test_read_only_store_refuses_a_schema_it_does_not_know(tmp_path: Path) -> None:
    path = tmp_path / "podbay.db"
    async with await Store.open(path):
        pass
    raw = sqlite3.connect(path)
    with raw:
        raw.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)",
            (len(MIGRATIONS) + 1,),
        )
    raw.close()
    with pytest.raises(StoreError, match="newer than this podbay"):
        await Store.open(path, read_only=True)
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("DELETE FROM schema_migrations WHERE version >= ?", (len(MIGRATIONS),))
    raw.close()
    with pytest.raises(StoreError, match="older than this podbay"):
        await Store.open(path, read_only=True)


# -- the status line shows how old its figures are ------------------------------------


def test_status_line_shows_the_age_of_the_stats_sample() -> None:
    now = 1_000_000.0
    project = ProjectRow(
        name="demo",
        stack="python",
        path="/src/demo",
        git_url="",
        ssh_port=2201,
        state="ready",
        container_id="c1",
        image="podbay-python",
        created_by="console:me",
        settings={},
        created_at=now - 3600,
        updated_at=now - 3600,
    )
    info = ContainerInfo(
        id="c1",
        name="podbay-demo",
        project="demo",
        instance="i",
        state="running",
        exit_code=None,
        started_at="",
        image="podbay-python",
        status_text="Up 1 hour",
    )
    report = StatusReport(
        projects=[project],
        active_runs=[],
        queue_depths={},
        jobs=[],
        containers={"demo": info},
        stats={"demo": ContainerStats(12.4, 50 * 1024 * 1024, 0, now - 95)},
    )
    assert "cpu 12% mem 50M (sampled 1m ago)" in render_status(report, now)
    first = {"demo": ContainerStats(None, 50 * 1024 * 1024, 0, now - 3)}
    line = render_status(StatusReport([project], [], {}, [], {"demo": info}, stats=first), now)
    assert "· mem 50M (sampled 3s ago)" in line and "cpu" not in line


# -- logs -----------------------------------------------------------------------------


def _log_text(data_dir: Path) -> str:
    for handler in logging.getLogger().handlers:
        handler.flush()
    return (data_dir / "podbay.log").read_text()


def test_log_file_keeps_podbay_info_but_only_warnings_of_libraries(
    tmp_path: Path, clean_logging: None
) -> None:
    (tmp_path / "empty.toml").write_text("")
    settings, _ = load_settings(tmp_path / "empty.toml", data_dir=tmp_path / "data")
    _setup_logging(0, settings.data_dir, settings.log)
    logging.getLogger("nio.client.async_client").info("sync event m.room.message")
    logging.getLogger("aiosqlite").info("executing query")
    logging.getLogger("nio.rooms").warning("room state is odd")
    logging.getLogger("podbay.dispatcher").info("run 7 started")
    text = _log_text(settings.data_dir)
    assert "run 7 started" in text
    assert "room state is odd" in text
    assert "sync event" not in text and "executing query" not in text


def test_log_file_rotates_at_the_configured_size_and_keeps_the_configured_count(
    tmp_path: Path, clean_logging: None
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[log]\nmax_bytes = 2000\nbackups = 2\n")
    data_dir = tmp_path / "data"
    # Through the real entry point, so the [log] keys are what it reads.
    assert main(["--config", str(config), "--data-dir", str(data_dir), "status"]) == 0
    log = logging.getLogger("podbay.test")
    for n in range(200):
        log.warning("line %03d %s", n, "x" * 40)
    _log_text(data_dir)
    files = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("podbay.log"))
    assert files == ["podbay.log", "podbay.log.1", "podbay.log.2"]
    for name in files:
        assert (data_dir / name).stat().st_size <= 2000
    assert "line 199" in (data_dir / "podbay.log").read_text()
    assert "line 000" not in "".join((data_dir / n).read_text() for n in files)


def test_log_settings_are_validated(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[log]\nmax_bytes = 10\n")
    result = _podbay(tmp_path, "status", config=config.read_text())
    assert result.returncode == 2
    assert "log.max_bytes = 10" in result.stderr
