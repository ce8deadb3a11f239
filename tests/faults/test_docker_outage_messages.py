"""While the Docker engine is down, every command that needs it (`logs`, `restart`, `ssh`,
the `rebuild` job) says the engine is not reachable, instead of "Something went wrong"."""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_support_kill import LivePodbay, PrivateDockerd, podbay_env
from test_docker_restart import _config, engine  # noqa: F401  (the private-dockerd fixture)


@pytest.mark.parametrize(
    ("command", "reply_marker"),
    [
        ("logs before", "\n"),
        ("restart before", "\n"),
        ("ssh before", "\n"),
        ("rebuild before", "rebuild before failed"),
    ],
)
def test_a_command_needing_docker_says_docker_is_unreachable(
    engine: PrivateDockerd,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    command: str,
    reply_marker: str,
) -> None:
    projects = tmp_path / "projects"
    projects.mkdir()
    env = podbay_env(tmp_path, _config(projects), **engine.environment)
    with LivePodbay(env, tmp_path / "podbay.log") as podbay:
        since = podbay.say("new project before")
        podbay.wait_for("before is ready", since=since, timeout=300)
        engine.stop()
        since = podbay.say(command)
        reply = podbay.wait_for(reply_marker, since=since, timeout=60)
        assert "Something went wrong" not in reply, reply
        assert "internal error" not in reply, reply
        assert "docker" in reply.lower(), reply
