"""What a new user meets first: role wording, config secrets, doctor, the Debian mirror."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fakes.harness import Harness
from pydantic import BaseModel, SecretStr

from podbay.config import load_settings
from podbay.engine.stacks import (
    base_image_spec,
    debian_mirror,
    discover_stacks,
    host_debian_mirrors,
    stack_image_spec,
)
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


# -- doctor ---------------------------------------------------------------------------------


def run_doctor(
    tmp_path: Path, config: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
    full["HOME"] = str(tmp_path / "home")
    full["PODBAY_DATA_DIR"] = str(tmp_path / "data")
    path = tmp_path / "config.toml"
    path.write_text(config)
    full["PODBAY_CONFIG"] = str(path)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "podbay", "doctor"],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
        check=False,
    )


def docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception:
        return False
    return True


def test_doctor_names_the_config_file_it_read(tmp_path: Path) -> None:
    result = run_doctor(tmp_path, "[bot]\nname = 'podbay'\n")
    assert f"ok: config file {tmp_path / 'config.toml'}" in result.stdout


def test_doctor_says_when_no_config_file_was_read(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
    env.update(HOME=str(tmp_path / "home"), PODBAY_DATA_DIR=str(tmp_path / "data"))
    result = subprocess.run(
        [sys.executable, "-m", "podbay", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert "ok: no config file: built-in defaults" in result.stdout
    assert "podbay init" in result.stdout


def test_doctor_reports_missing_host_tools_each_with_a_fix(tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    result = run_doctor(tmp_path, env={"PATH": str(empty_bin)})
    assert result.returncode == 1
    out = result.stdout
    for tool, why in (("git", "clones"), ("ssh-keygen", "keys"), ("ssh", "log in")):
        assert f"problem: `{tool}` is not on PATH" in out, tool
        assert why in out
    assert out.count("fix: install openssh-client") == 2
    assert "fix: install git" in out


def test_doctor_finds_the_host_tools_it_needs(tmp_path: Path) -> None:
    if not all(shutil.which(t) for t in ("git", "ssh", "ssh-keygen")):
        pytest.skip("needs git and openssh-client")
    result = run_doctor(tmp_path)
    assert "ok: git, ssh and ssh-keygen found" in result.stdout


@pytest.mark.skipif(not docker_answers(), reason="needs a Docker engine")
def test_doctor_reports_a_base_image_that_can_neither_be_found_nor_built(tmp_path: Path) -> None:
    result = run_doctor(tmp_path, '[docker]\nbase_image = "podbay-test-no-such-image:1"\n')
    assert result.returncode == 1
    out = result.stdout
    assert "problem: podbay-base cannot be built: its FROM image podbay-test-no-such-image:1" in out
    assert "fix: run ./scripts/ensure-docker" in out


@pytest.mark.skipif(not docker_answers(), reason="needs a Docker engine")
def test_doctor_says_the_base_image_is_present_or_buildable(tmp_path: Path) -> None:
    result = run_doctor(tmp_path)
    out = result.stdout
    assert "ok: base image podbay-base:" in out
    assert ("present" in out) or ("built on the first `new project` from" in out)


def test_doctor_reports_an_ssh_port_range_with_no_free_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_doctor(tmp_path, f"[projects]\nssh_port_range = [{port}, {port}]\n")
    assert result.returncode == 1
    out = result.stdout
    assert f"problem: no free SSH port left in projects.ssh_port_range {port}-{port}" in out
    assert "fix: widen `projects.ssh_port_range`" in out


def test_doctor_counts_the_free_ssh_ports(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    low, high = port, port + 4
    result = run_doctor(tmp_path, f"[projects]\nssh_port_range = [{low}, {high}]\n")
    assert f"ok: SSH ports {low}-{high}: " in result.stdout
    assert " of 5 free" in result.stdout


# -- Debian mirror ----------------------------------------------------------------------------

DEB822 = """\
Types: deb
# a comment
URIs: http://mirror.example.test/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.test/debian-security
Suites: bookworm-security
Components: main
"""

ONE_LINE = """\
# deb http://commented.example.test/debian bookworm main
deb-src http://src.example.test/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://list.example.test/debian bookworm main
deb http://list.example.test/debian-security bookworm-security main
"""


def apt_etc(tmp_path: Path, sources: str | None = None, sources_list: str | None = None) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    if sources is not None:
        (etc / "sources.list.d" / "debian.sources").write_text(sources)
    if sources_list is not None:
        (etc / "sources.list").write_text(sources_list)
    return etc


def print_mirror(etc: Path, env: dict[str, str] | None = None) -> list[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_DEBIAN")}
    full.update(PODBAY_APT_ETC=str(etc), **(env or {}))
    result = subprocess.run(
        [str(PROJECT_ROOT / "scripts" / "ensure-docker"), "--print-mirror"],
        capture_output=True,
        text=True,
        env=full,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_the_mirror_comes_from_the_hosts_deb822_sources(tmp_path: Path) -> None:
    etc = apt_etc(tmp_path, sources=DEB822)
    assert host_debian_mirrors(etc) == (
        "http://mirror.example.test/debian",
        "http://mirror.example.test/debian-security",
    )
    assert print_mirror(etc) == [
        "http://mirror.example.test/debian",
        "http://mirror.example.test/debian-security",
    ]


def test_the_mirror_comes_from_a_one_line_sources_list(tmp_path: Path) -> None:
    etc = apt_etc(tmp_path, sources_list=ONE_LINE)
    expected = ("http://list.example.test/debian", "http://list.example.test/debian-security")
    assert host_debian_mirrors(etc) == expected
    assert print_mirror(etc) == list(expected)


def test_the_environment_overrides_the_hosts_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = apt_etc(tmp_path, sources=DEB822)
    env = {"PODBAY_DEBIAN_MIRROR": "http://env.example.test/debian"}
    assert print_mirror(etc, env)[0] == "http://env.example.test/debian"
    monkeypatch.setenv("PODBAY_DEBIAN_MIRROR", "http://env.example.test/debian")
    assert debian_mirror(etc) == "http://env.example.test/debian"


def test_a_host_without_debian_sources_has_no_mirror(tmp_path: Path) -> None:
    ubuntu = "deb http://ubuntu.example.test/ubuntu noble main\n"
    etc = apt_etc(tmp_path, sources_list=ubuntu)
    assert host_debian_mirrors(etc) == ("", "")
    assert print_mirror(etc) == ["", ""]


def test_the_go_stack_gets_the_mirror_as_a_build_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PODBAY_DEBIAN_MIRROR", "http://env.example.test/debian")
    stacks = discover_stacks()
    base = base_image_spec("debian:bookworm-slim", 1000, 1000)
    go = stack_image_spec(base, stacks["go"])
    assert go.buildargs["DEBIAN_MIRROR"] == "http://env.example.test/debian"
    monkeypatch.setenv("PODBAY_DEBIAN_MIRROR", "http://other.example.test/debian")
    assert stack_image_spec(base, stacks["go"]).tag != go.tag, "the mirror is an image input"
    # Stacks that do not declare the argument keep their tags.
    python = stack_image_spec(base, stacks["python"])
    assert "DEBIAN_MIRROR" not in python.buildargs
    assert "DEBIAN_MIRROR" not in base.buildargs


def registry_hosts() -> set[str]:
    """The package registries this machine is configured with: its Debian mirrors (apt
    sources), its npm registry and its pip indexes. None of them may be named in the repo."""
    urls = [u for u in host_debian_mirrors() if u]
    if shutil.which("npm"):
        npm = subprocess.run(
            ["npm", "config", "get", "registry"], capture_output=True, text=True, check=False
        )
        urls.append(npm.stdout.strip())
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    urls += re.findall(r"[a-z][a-z0-9+.-]*://[^\s'\"]+", pip.stdout)
    hosts = {urlsplit(url).hostname or "" for url in urls}
    return {h for h in hosts if "." in h and h not in ("localhost", "127.0.0.1")}


def test_no_registry_host_is_hard_coded_in_the_repository() -> None:
    hosts = registry_hosts()
    assert hosts, "this machine names no package registry: the test would prove nothing"
    listed = subprocess.run(
        ["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    me = Path(__file__).resolve()
    found = []
    for name in listed:
        path = PROJECT_ROOT / name
        if path.resolve() == me or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{name}: {host}" for host in hosts if host in text]
    assert found == []
