"""The real ``podbay`` command, run as a subprocess the way a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from podbay.config import config_reference, load_settings


def clean_env(tmp_path: Path, config: str | None = None) -> dict[str, str]:
    """The user's environment minus PODBAY_*, with a private HOME and data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
    env["HOME"] = str(tmp_path / "home")
    env["PODBAY_DATA_DIR"] = str(tmp_path / "data")
    if config is not None:
        path = tmp_path / "config.toml"
        path.write_text(config)
        env["PODBAY_CONFIG"] = str(path)
    return env


def start_run(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`podbay run` in the background with piped stdio."""
    return subprocess.Popen(
        [sys.executable, "-m", "podbay", "run"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def podbay(
    tmp_path: Path,
    *args: str,
    stdin: str = "",
    config: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    full_env = clean_env(tmp_path, config)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "podbay", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def agent_config(tmp_path: Path, body: str, extra: str = "") -> str:
    script = tmp_path / "agent.py"
    script.write_text(body)
    return (
        f"[agent]\ncommand = [{sys.executable!r}, {str(script)!r}]\n"
        "[dispatcher]\ncoalesce_window_ms = 200\n" + extra
    ).replace("'", '"')


def test_piped_help_and_status_print_both_and_exit_zero(tmp_path: Path) -> None:
    result = podbay(tmp_path, "chat", stdin="help\nstatus\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "podbay — you are admin. Commands:" in out
    assert "new project <name> [--stack S]" in out
    assert "Projects: none yet" in out
    assert out.index("Commands:") < out.index("Projects:")
    assert "**" not in out and "`" not in out, "Markdown is rendered as plain text"


def test_chat_is_the_default_command(tmp_path: Path) -> None:
    result = podbay(tmp_path, stdin="whoami\n")
    assert result.returncode == 0, result.stderr
    assert "You are console:" in result.stdout and "(admin)" in result.stdout


def test_freeform_line_reaches_the_host_agent_and_its_output_is_printed(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "import sys\nprint('agent got: ' + sys.stdin.read().upper())\n")
    result = podbay(tmp_path, "chat", stdin="hello there\n", config=config)
    assert result.returncode == 0, result.stderr
    assert "agent got: HELLO THERE" in result.stdout


def test_end_of_input_waits_for_running_and_queued_work(tmp_path: Path) -> None:
    started = tmp_path / "started"
    config = agent_config(
        tmp_path,
        "import sys, time\n"
        "prompt = sys.stdin.read()\n"
        f"open({str(started)!r}, 'a').close()\n"
        "time.sleep(1.0)\n"
        "print('done with: ' + prompt.replace(chr(10), ' | '))\n",
    )
    # "second" and "third" arrive while the first run is busy, then input ends at once.
    feed = tmp_path / "feed.sh"
    feed.write_text(
        "printf 'first\\n'\n"
        f"while [ ! -e {started} ]; do sleep 0.05; done\n"
        "printf 'second\\nthird\\n'\n"
    )
    env = clean_env(tmp_path, config)
    piped = subprocess.run(
        f"bash {feed} | {sys.executable} -m podbay chat",
        shell=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    out = piped.stdout
    assert "done with: first" in out
    assert "done with: second |  | third" in out
    assert out.index("done with: first") < out.index("done with: second")


def test_failing_agent_is_reported_with_its_stderr(tmp_path: Path) -> None:
    config = agent_config(
        tmp_path, "import sys\nprint('model quota exceeded', file=sys.stderr)\nsys.exit(7)\n"
    )
    result = podbay(tmp_path, "chat", stdin="do it\n", config=config)
    assert result.returncode == 0
    assert "Agent run failed (exit 7)" in result.stdout
    assert "model quota exceeded" in result.stdout


def test_no_agent_configured_says_how_to_configure_one(tmp_path: Path) -> None:
    result = podbay(tmp_path, "chat", stdin="write a haiku\n")
    assert result.returncode == 0
    assert "No agent is configured" in result.stdout and "[agent]" in result.stdout


def test_status_subcommand_prints_the_chat_status_report(tmp_path: Path) -> None:
    podbay(tmp_path, "chat", stdin="status\n")
    chat = podbay(tmp_path, "chat", stdin="status\n").stdout.strip()
    cli = podbay(tmp_path, "status")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == chat


def test_invalid_config_fails_at_start_naming_key_value_and_form(tmp_path: Path) -> None:
    result = podbay(
        tmp_path, "chat", stdin="help\n", config='[dispatcher]\ncoalesce_window_ms = "soon"\n'
    )
    assert result.returncode == 2
    assert "dispatcher.coalesce_window_ms = 'soon'" in result.stderr
    assert "valid integer" in result.stderr
    result = podbay(tmp_path, "chat", config="[dispatcher]\ncoalese_window_ms = 5\n")
    assert "unknown key dispatcher.coalese_window_ms" in result.stderr
    assert "did you mean 'coalesce_window_ms'" in result.stderr


def test_environment_overrides_the_file_and_is_validated_too(tmp_path: Path) -> None:
    result = podbay(
        tmp_path,
        "chat",
        stdin="help\n",
        env={"PODBAY_ACCESS__ADMINS": '["nobody-here"]'},
    )
    assert result.returncode == 2
    assert "access.admins" in result.stderr and "<transport>:<user id>" in result.stderr


def test_init_writes_every_key_with_its_default_and_loads_back(tmp_path: Path) -> None:
    target = tmp_path / "podbay.toml"
    result = podbay(tmp_path, "init", "--config", str(target))
    assert result.returncode == 0, result.stderr
    text = target.read_text()
    data = tomllib.loads(text)
    for key, default, _ in config_reference():
        if key == "data_dir":
            assert "# data_dir =" in text
            continue
        if key == "agent.where":  # follows the preset unless set
            assert '# where = "container"' in text
            continue
        node: object = data
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, key
            node = node[part]
        if isinstance(default, Path):
            default = str(default)
        elif isinstance(default, tuple):
            default = list(default)
        assert node == default, key
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    settings, read = load_settings(target)
    assert read == target and settings.dispatcher.coalesce_window_ms == 1500
    again = podbay(tmp_path, "init", "--config", str(target))
    assert again.returncode == 1 and "--force" in again.stderr


def test_doctor_reports_each_problem_with_its_fix(tmp_path: Path) -> None:
    result = podbay(
        tmp_path,
        "doctor",
        config='[agent]\ncommand = ["definitely-not-an-agent-binary"]\n',
        env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"},
    )
    assert result.returncode == 1
    out = result.stdout
    assert "problem: Docker engine not reachable" in out and "fix: start dockerd" in out
    assert "problem: agent command 'definitely-not-an-agent-binary' is not on PATH" in out
    assert "ok: data dir" in out


def test_doctor_fails_on_a_bad_config(tmp_path: Path) -> None:
    result = podbay(tmp_path, "doctor", config="[bot]\nname = 'two words'\n")
    assert result.returncode == 2
    assert "bot.name" in result.stderr


def test_readme_documents_every_config_key(project_root: Path) -> None:
    readme = (project_root / "README.md").read_text()
    missing = [key for key, _, _ in config_reference() if f"`{key}`" not in readme]
    assert missing == []


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_run_stops_cleanly_on_signals(tmp_path: Path, signal_name: str) -> None:
    import signal
    import threading

    proc = start_run(tmp_path, clean_env(tmp_path))
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("whoami\n")
    proc.stdin.flush()
    # Signal once podbay is serving: its answer to `whoami` is the proof (a watchdog ends a
    # podbay that never answers, so the read cannot hang).
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        seen = ""
        for line in proc.stdout:
            seen += line
            if "You are console:" in line:
                break
    finally:
        watchdog.cancel()
    assert "You are console:" in seen
    proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_sigterm_during_a_run_cancels_it_records_it_and_kills_the_agent(tmp_path: Path) -> None:
    import signal
    import sqlite3
    import time

    pidfile = tmp_path / "agent.pid"
    config = agent_config(
        tmp_path,
        "import os, sys, time\n"
        "sys.stdin.read()\n"
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n",
        extra="shutdown_grace_s = 0.5\n",
    )
    proc = start_run(tmp_path, clean_env(tmp_path, config))
    assert proc.stdin is not None
    proc.stdin.write("work for a long time\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "agent never started"
        time.sleep(0.05)
    agent_pid = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not Path(f"/proc/{agent_pid}").exists() or (
        Path(f"/proc/{agent_pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    )
    with sqlite3.connect(tmp_path / "data" / "podbay.db") as db:
        rows = db.execute("SELECT prompt, status FROM runs").fetchall()
    assert rows == [("work for a long time", "cancelled")]


def test_an_undecodable_line_gets_its_own_error_and_later_lines_are_still_answered(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "podbay", "chat"],
        input=b"status\n\xff\nwhoami\n",
        capture_output=True,
        env=clean_env(tmp_path),
        timeout=60,
        check=False,
    )
    out = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert "Projects: none yet" in out
    assert "line 2 is not valid UTF-8" in out
    assert "You are console:" in out
    assert out.index("Projects:") < out.index("You are console:")
    assert out.count("is not valid UTF-8") == 1
    assert "Traceback" not in result.stderr.decode("utf-8", "replace")


def test_doctor_says_a_claude_cli_not_fetched_yet_comes_on_first_use(tmp_path: Path) -> None:
    result = podbay(tmp_path, "doctor", config='[agent]\npreset = "claude"\n')
    out = result.stdout
    assert "agent: claude 2.1.332 not fetched yet; podbay fetches it on first use" in out
    assert "problem: agent" not in out


def test_doctor_reports_missing_npm_when_the_cli_is_not_fetched_yet(tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    result = podbay(
        tmp_path, "doctor", config='[agent]\npreset = "codex"\n', env={"PATH": str(empty_bin)}
    )
    assert result.returncode == 1
    assert "problem: agent: codex 0.171.0 is not fetched yet and npm is not on PATH" in (
        result.stdout
    )
    assert "fix: install npm" in result.stdout


def test_doctor_shows_where_the_fetched_cli_is_installed(tmp_path: Path) -> None:
    import asyncio
    import shutil

    from podbay.engine.agent_cli import AgentCliStore

    if shutil.which("npm") is None:
        pytest.skip("needs npm")
    data = tmp_path / "data"
    cli = asyncio.run(AgentCliStore(data).ensure("claude"))
    try:
        result = podbay(tmp_path, "doctor", config='[agent]\npreset = "claude"\n')
        assert f"ok: agent: claude 2.1.332 installed at {cli.host_dir}" in result.stdout
    finally:
        shutil.rmtree(data / "agents", ignore_errors=True)


def test_doctor_flags_a_coding_agent_set_to_run_outside_the_container(tmp_path: Path) -> None:
    result = podbay(tmp_path, "doctor", config='[agent]\npreset = "claude"\nwhere = "host"\n')
    assert result.returncode == 1
    assert "problem: agent: claude is set to run outside the project container" in result.stdout
    assert "no agent runs at all" in result.stdout  # what really happens, said plainly
    assert 'fix: set `[agent] where = "container"`' in result.stdout


def test_doctor_does_not_look_for_a_container_command_on_the_host(tmp_path: Path) -> None:
    result = podbay(
        tmp_path, "doctor", config='[agent]\ncommand = ["only-in-the-image"]\nwhere = "container"\n'
    )
    assert "problem: agent command" not in result.stdout
    assert "agent command 'only-in-the-image' runs in the project container" in result.stdout
