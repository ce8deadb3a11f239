"""What a new user meets first: role wording, config secrets, doctor, the Debian mirror."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fakes.harness import Harness
from pydantic import BaseModel, SecretStr

from podbay.config import load_settings
from podbay.errors import ConfigError


async def test_an_operator_is_told_they_are_an_operator(harness: Harness) -> None:
    await harness.transport.say("delete demo", user="bob")
    reply = await harness.transport.wait_for_text("needs the admin role")
    assert "you are an operator" in reply


def test_a_long_build_progress_line_is_cut_at_a_word_boundary() -> None:
    from podbay.engine.stacks import progress_line

    step = "Step 5/9 : RUN apt-get install -y --no-install-recommends " + " ".join(
        f"package-number-{i}" for i in range(20)
    )
    shown = progress_line(step)
    assert len(shown) <= 120 and shown.endswith("…")
    assert step.startswith(shown[:-1].rstrip())
    assert step[len(shown[:-1].rstrip())] == " ", "cut between words"
    assert progress_line("Step 1/9 : FROM base") == "Step 1/9 : FROM base"
    # One word longer than the limit is cut inside it rather than dropped.
    assert progress_line("x" * 300) == "x" * 119 + "…"


def test_matrix_credentials_are_secrets_in_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[transports.matrix]\nhomeserver = "http://127.0.0.1:1"\nuser_id = "@bot:x"\n'
        'password = "hunter2-password"\naccess_token = "syt_secret_token_value"\n'
    )
    settings, _ = load_settings(config, data_dir=tmp_path / "data")
    matrix = settings.transports.matrix
    assert isinstance(matrix.password, SecretStr) and isinstance(matrix.access_token, SecretStr)
    assert matrix.password.get_secret_value() == "hunter2-password"
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert "hunter2-password" not in shown and "syt_secret_token_value" not in shown


def test_a_config_error_never_shows_a_matrix_secret(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[transports.matrix]\npassword = ["hunter2-password"]\n')
    with pytest.raises(ConfigError) as err:
        load_settings(config, data_dir=tmp_path / "data")
    assert "transports.matrix.password" in str(err.value)
    assert "hunter2-password" not in str(err.value)


def test_every_secret_looking_config_key_is_a_secretstr() -> None:
    from podbay.config import Settings

    def walk(model: type[BaseModel], prefix: str) -> list[tuple[str, object]]:
        found: list[tuple[str, object]] = []
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                found += walk(annotation, f"{prefix}{name}.")
            else:
                found.append((f"{prefix}{name}", annotation))
        return found

    secretish = re.compile(r"password|token|secret|api_key|(^|\.)key$")
    plain = [k for k, a in walk(Settings, "") if secretish.search(k) and "SecretStr" not in str(a)]
    assert plain == []
