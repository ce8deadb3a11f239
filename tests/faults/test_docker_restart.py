"""The Docker engine stops and starts again while the real `podbay run` keeps running.

While the engine is down, commands answer at once with an error that names Docker (no
hang, no traceback) and leave nothing half-made; once it is back, the SAME podbay process
works again: status is clean and `new project` succeeds.

Stopping the engine every other test uses would break them, so this test runs a second
dockerd of its own (own socket, data root and state; no bridge, no iptables), points
podbay at it with DOCKER_HOST and copies podbay's base image into it (`docker save |
docker load`). That needs root and the `dockerd` binary (./scripts/test installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_support_kill import (
    LivePodbay,
    PrivateDockerd,
    local_ca_certs,
    podbay_env,
    query,
    toml_list,
)

from podbay.engine.stacks import base_image_spec, dev_ids


def _config(projects: Path) -> str:
    return f"""
[access]
admins = ["console:*"]
[projects]
root = "{projects}"
[docker]
network = "host"
name_prefix = "pbr{os.urandom(3).hex()}-"
ready_timeout_s = 120
reconcile_interval_s = 3600
stats_interval_s = 3600
extra_ca_certs = {toml_list(local_ca_certs())}
[git]
user_name = "Test Dev"
user_email = "dev@example.org"
"""


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[PrivateDockerd]:
    """A private dockerd holding podbay's base image (from the main engine)."""
    if os.getuid() != 0:
        pytest.skip("starting a second Docker engine (dockerd) needs root")
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("dockerd/docker are not installed here (./scripts/ensure-docker installs them)")
    from docker.client import DockerClient

    try:
        main = DockerClient.from_env(timeout=30)
        driver = str(main.info().get("Driver") or "vfs")
        main.close()
    except Exception as exc:
        pytest.fail(f"the main Docker engine does not answer ({exc}); run ./scripts/ensure-docker")
    # podbay's base image, built (or found) on the main engine with this test's settings.
    env = podbay_env(tmp_path, _config(tmp_path / "projects"))
    built = subprocess.run(
        [sys.executable, "-m", "podbay", "images", "build"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    tag = base_image_spec("debian:bookworm-slim", *dev_ids(), local_ca_certs()).tag

    base = Path(tempfile.mkdtemp(prefix="pbd-", dir="/tmp"))  # short: sockets live below
    private = PrivateDockerd(base, driver)
    try:
        private.start()
        save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
        loaded = subprocess.run(
            ["docker", "load", "-q"],
            stdin=save.stdout,
            env={**os.environ, **private.environment},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert save.stdout is not None
        save.stdout.close()
        assert save.wait(timeout=60) == 0 and loaded.returncode == 0, loaded.stderr
        yield private
    finally:
        try:
            if private.proc is not None and private.proc.poll() is None:
                client = DockerClient.from_env(timeout=60, environment=private.environment)
                for container in client.containers.list(all=True):
                    container.remove(force=True, v=True)
                client.close()
        finally:
            private.close()
            shutil.rmtree(base, ignore_errors=True)


def test_commands_fail_clearly_while_docker_is_down_and_podbay_recovers_by_itself(
    engine: PrivateDockerd, tmp_path: Path
) -> None:
    projects = tmp_path / "projects"
    projects.mkdir()
    env = podbay_env(tmp_path, _config(projects), **engine.environment)
    db = tmp_path / "data" / "podbay.db"
    with LivePodbay(env, tmp_path / "podbay.log") as podbay:
        since = podbay.say("new project before")
        podbay.wait_for("before is ready", since=since, timeout=300)
        since = podbay.say("status")
        up = podbay.wait_for("Runs:", since=since)
        assert "before · base · running" in up and "Docker:" not in up, up

        engine.stop()

        # status still answers: what podbay knows, and why the containers are unknown.
        since = podbay.say("status")
        down = podbay.wait_for("Docker:", since=since, timeout=60)
        assert "before · base · container unknown" in down, down
        assert "⚠ container missing" not in down, "an engine outage is no missing container"
        # A new project fails at once, saying Docker, and leaves nothing behind.
        since = podbay.say("new project during")
        failed = podbay.wait_for("new project during failed", since=since, timeout=60)
        assert "Could not create during: The Docker engine is not reachable" in failed, failed
        assert [row[0] for row in query(db, "SELECT name FROM projects")] == ["before"]
        assert not (projects / "during").exists()

        engine.start()

        # The same podbay process: no restart, no reconnect command.
        assert podbay.proc.poll() is None
        since = podbay.say("status")
        back = podbay.wait_for("Runs:", since=since, timeout=60)
        assert "Docker:" not in back, back
        # The engine restarted the container it had stopped (restart policy unless-stopped).
        assert "before · base · running" in back, back
        since = podbay.say("new project during")
        ready = podbay.wait_for("during is ready", since=since, timeout=300)
        assert "failed" not in ready, ready
        output = podbay.output()
        assert podbay.finish() == 0
    assert "Traceback" not in output
    assert "internal error" not in output and "Something went wrong" not in output, output
