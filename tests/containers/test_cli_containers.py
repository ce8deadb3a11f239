"""The podbay command line with real containers: chat, status, ssh-config, trash, images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from docker_support import ca_toml, container_settings, remove_instance_containers

from podbay.engine.lifecycle import instance_id


def run(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "podbay", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def test_console_creates_lists_deletes_and_restores_a_project(
    docker_engine: None, tmp_path: Path
) -> None:
    settings = container_settings(tmp_path)
    root = tmp_path / "projects"
    root.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[projects]\nroot = "{root}"\n'
        f'[docker]\nnetwork = "host"\nname_prefix = "{settings.docker.name_prefix}"\n'
        + ca_toml()
        + '[git]\nuser_name = "Console Dev"\nuser_email = "console@example.org"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
    env |= {"PODBAY_CONFIG": str(config), "PODBAY_DATA_DIR": str(settings.data_dir)}
    try:
        created = run(env, "chat", stdin="new project clidemo\n")
        assert created.returncode == 0, created.stderr
        assert "clidemo is ready" in created.stdout, created.stdout
        alias = f"{settings.docker.name_prefix}clidemo"
        assert f"Host {alias}" in created.stdout

        status = run(env, "status")
        assert "clidemo · base · running · up " in status.stdout, status.stdout

        config_block = run(env, "ssh-config")
        assert config_block.stdout.startswith(f"Host {alias}\n")
        known = settings.data_dir / "ssh" / "known_hosts"
        assert f"  UserKnownHostsFile {known}" in config_block.stdout
        assert f"{alias} ssh-ed25519 " in known.read_text()
        written = run(env, "ssh-config", "--write")
        assert f"Include {settings.data_dir / 'ssh_config'}" in written.stdout
        assert (settings.data_dir / "ssh_config").read_text() == config_block.stdout

        (root / "clidemo" / "work.txt").write_text("unsaved idea")
        deleted = run(env, "chat", stdin="delete clidemo --purge\nconfirm\n")
        assert "Deleted clidemo" in deleted.stdout, deleted.stdout
        assert not (root / "clidemo").exists()

        listing = run(env, "trash")
        entry = listing.stdout.split()[0]
        assert entry.startswith("clidemo-") and str(root / "clidemo") in listing.stdout
        restored = run(env, "trash", "restore", entry)
        assert restored.returncode == 0, restored.stderr
        assert (root / "clidemo" / "work.txt").read_text() == "unsaved idea"
        assert "The trash is empty." in run(env, "trash").stdout

        images = run(env, "images", "build")
        assert images.returncode == 0, images.stderr
        assert images.stdout.strip().splitlines()[-1].startswith("ready: podbay-base:")
    finally:
        remove_instance_containers(instance_id(settings.data_dir), settings)


def test_doctor_checks_docker_cpus_against_the_engines_cpus(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
    env["PODBAY_DATA_DIR"] = str(tmp_path / "data")
    config = tmp_path / "config.toml"
    env["PODBAY_CONFIG"] = str(config)
    config.write_text("[docker]\ncpus = 4096\n")
    result = run(env, "doctor")
    assert "problem: docker.cpus = 4096 is more than the Docker engine's" in result.stdout
    assert "fix: set `docker.cpus` to at most" in result.stdout
    assert result.returncode == 1
    config.write_text("[docker]\ncpus = 1\n")
    result = run(env, "doctor")
    assert "ok: docker.cpus = 1 fits the Docker engine's" in result.stdout
