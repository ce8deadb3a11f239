"""The ``[agent]`` section: the documented shape loads, secrets stay secret, errors name keys."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from podbay.config import default_config_toml, load_settings
from podbay.errors import ConfigError

SECRET = "sk-ant-test-4f9c2e1d-never-shown"

# The shape from the issue, as a user writes it.
ISSUE_SHAPE = f"""
[agent]
preset = "claude"          # "claude" | "codex" | "command" (today's behaviour)
where = "container"        # "container" (default for claude/codex) | "host"
version = ""               # pin the CLI version; empty = the version podbay was tested with
extra_args = []            # appended to the preset's argv
permission_mode = "bypassPermissions"   # claude only; the container is the sandbox

[agent.env]                # passed to the agent's process only
ANTHROPIC_API_KEY = "{SECRET}"
"""


@pytest.fixture(autouse=True)
def _no_podbay_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PODBAY_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    return str(caught.value)


def test_the_documented_agent_section_loads_as_written(tmp_path: Path) -> None:
    settings, _ = load_settings(write(tmp_path, ISSUE_SHAPE))
    agent = settings.agent
    assert (agent.preset, agent.where, agent.version) == ("claude", "container", "")
    assert agent.extra_args == [] and agent.permission_mode == "bypassPermissions"
    assert agent.resolved_env() == {"ANTHROPIC_API_KEY": SECRET}
    assert (agent.stop_grace_s, agent.model, agent.base_url) == (1.5, "", "")


@pytest.mark.parametrize(
    ("preset", "where"), [("claude", "container"), ("codex", "container"), ("command", "host")]
)
def test_where_defaults_to_the_container_for_coding_agents_and_host_for_a_command(
    tmp_path: Path, preset: str, where: str
) -> None:
    settings, _ = load_settings(write(tmp_path, f'[agent]\npreset = "{preset}"\n'))
    assert settings.agent.where == where


def test_an_explicit_where_beats_the_preset_default(tmp_path: Path) -> None:
    settings, _ = load_settings(write(tmp_path, '[agent]\npreset = "codex"\nwhere = "host"\n'))
    assert settings.agent.where == "host"


def test_a_file_entry_is_read_at_start_into_the_name_without_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    settings, _ = load_settings(
        write(tmp_path, f'[agent.env]\nANTHROPIC_API_KEY_FILE = "{key_file}"\nOTHER = "x"\n')
    )
    # One trailing newline (what `echo` writes) is not part of the key.
    assert settings.agent.resolved_env() == {"ANTHROPIC_API_KEY": SECRET, "OTHER": "x"}


def test_a_missing_key_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "key"
    error = load_error(tmp_path, f'[agent.env]\nOPENAI_API_KEY_FILE = "{missing}"\n')
    assert "agent.env" in error and "OPENAI_API_KEY_FILE" in error and str(missing) in error
    assert "No such file" in error


def test_an_unreadable_key_file_never_shows_its_content(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"\xff\xfe" + SECRET.encode())
    error = load_error(tmp_path, f'[agent.env]\nANTHROPIC_API_KEY_FILE = "{key_file}"\n')
    assert "ANTHROPIC_API_KEY_FILE" in error and "not UTF-8" in error
    assert SECRET not in error


def test_a_key_given_both_directly_and_as_a_file_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file")
    error = load_error(
        tmp_path,
        f'[agent.env]\nANTHROPIC_API_KEY = "{SECRET}"\nANTHROPIC_API_KEY_FILE = "{key_file}"\n',
    )
    assert "ANTHROPIC_API_KEY" in error and "only one" in error
    assert SECRET not in error and "from-file" not in error


@pytest.mark.parametrize("name", ["1BAD", "BAD-NAME", "WITH SPACE", "A=B"])
def test_an_invalid_variable_name_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    error = load_error(tmp_path, f'[agent.env]\n"{name}" = "{SECRET}"\n')
    assert "agent.env" in error and name in error and "letters, digits" in error
    assert SECRET not in error


def test_podbay_variables_are_refused_for_the_agent(tmp_path: Path) -> None:
    error = load_error(tmp_path, f'[agent.env]\nPODBAY_RUN = "{SECRET}"\n')
    assert "agent.env" in error and "PODBAY_RUN" in error and "podbay's own" in error
    assert SECRET not in error


def test_a_non_string_value_is_refused_without_echoing_it(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[agent.env]\nPIN = 918273645\n")
    assert "agent.env" in error and "PIN" in error and "string" in error
    assert "918273645" not in error


def test_the_secret_never_appears_in_the_settings_repr_or_dump(tmp_path: Path) -> None:
    settings, _ = load_settings(write(tmp_path, ISSUE_SHAPE))
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET not in repr(settings.agent)
    assert SECRET not in settings.model_dump_json()


def test_an_error_elsewhere_in_the_file_does_not_show_the_secret(tmp_path: Path) -> None:
    error = load_error(tmp_path, ISSUE_SHAPE + '\n[bot]\nname = "two words"\n')
    assert "bot.name" in error and SECRET not in error


def test_an_environment_override_keeps_the_variable_name_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PODBAY_AGENT__ENV__ANTHROPIC_API_KEY", "from-environment")
    settings, _ = load_settings(write(tmp_path, ISSUE_SHAPE))
    assert settings.agent.resolved_env() == {"ANTHROPIC_API_KEY": "from-environment"}


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ('version = "../../etc"', "agent.version", "exact version"),
        ('version = "latest"', "agent.version", "exact version"),
        ('permission_mode = "bypass Permissions; rm"', "agent.permission_mode", "one word"),
        ('base_url = "127.0.0.1:8080"', "agent.base_url", "http(s) URL"),
        ('preset = "gemini"', "agent.preset", "claude"),
        ("stop_grace_s = -1", "agent.stop_grace_s", "greater than or equal"),
    ],
)
def test_bad_agent_values_name_the_key(tmp_path: Path, line: str, key: str, expected: str) -> None:
    error = load_error(tmp_path, f"[agent]\n{line}\n")
    assert key in error and expected in error


def test_init_output_shows_the_agent_section_and_an_env_table_that_loads(tmp_path: Path) -> None:
    text = default_config_toml()
    data = tomllib.loads(text)
    assert data["agent"]["env"] == {}
    assert "[agent.env]" in text and '# ANTHROPIC_API_KEY_FILE = "' in text
    # Uncommenting the example under [agent.env] gives a working file.
    key_file = tmp_path / "key"
    key_file.write_text(SECRET)
    edited = text.replace(
        '# ANTHROPIC_API_KEY_FILE = "/run/secrets/anthropic-key"',
        f'ANTHROPIC_API_KEY_FILE = "{key_file}"',
    )
    settings, _ = load_settings(write(tmp_path, edited))
    assert settings.agent.resolved_env() == {"ANTHROPIC_API_KEY": SECRET}
