"""Configuration: a TOML file plus ``PODBAY_*`` environment overrides.

Environment variables override the file; nested keys use ``__``, e.g.
``PODBAY_DISPATCHER__COALESCE_WINDOW_MS=500`` or ``PODBAY_ACCESS__ADMINS='["console:*"]'``.
Every error names the key, the bad value and the expected form.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from podbay.configbase import Section, TransportSection
from podbay.errors import ConfigError
from podbay.transports.plugins import discover

DEFAULT_CONFIG_PATH = Path("~/.config/podbay/config.toml")
DEFAULT_DATA_DIR = Path("~/.local/share/podbay")

_IDENTITY = re.compile(r"^[a-z][a-z0-9_-]*:\S.*$")


_Section = Section


class BotConfig(_Section):
    name: str = Field(
        "podbay", description="Name the bot answers to (`podbay help`, `@podbay help`)."
    )
    aliases: list[str] = Field(
        default_factory=list, description="Extra names the bot answers to, besides `name`."
    )

    @field_validator("name")
    @classmethod
    def _name_is_one_word(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,31}", value):
            raise ValueError(
                "expected a single word of letters, digits, '-' or '_' (e.g. \"podbay\")"
            )
        return value


class AccessConfig(_Section):
    admins: list[str] = Field(
        default_factory=lambda: ["console:*"],
        description='Identities with every right, as "<transport>:<user id>"; "<transport>:*" '
        "matches everyone on that transport.",
    )
    operators: list[str] = Field(
        default_factory=list, description="May create projects and drive agents, but not delete."
    )
    viewers: list[str] = Field(default_factory=list, description="May only read help and status.")
    deny_reply_interval_s: int = Field(
        3600, ge=0, description="Unknown senders get at most one refusal per this many seconds."
    )

    @field_validator("admins", "operators", "viewers")
    @classmethod
    def _identities(cls, values: list[str]) -> list[str]:
        for value in values:
            if not _IDENTITY.match(value):
                raise ValueError(
                    'expected "<transport>:<user id>" (e.g. "matrix:@alice:example.org"), '
                    f'got "{value}"'
                )
        return values


class DispatcherConfig(_Section):
    coalesce_window_ms: int = Field(
        1500, ge=0, description="Freeform messages arriving within this window form one agent run."
    )
    max_window_ms: int = Field(
        10000, ge=0, description="A batch fires at most this long after its first message."
    )
    max_message_bytes: int = Field(
        65536,
        ge=256,
        description="Longer inbound messages are refused with a reply (UTF-8 bytes).",
    )
    rate_limit_per_minute: int = Field(
        60,
        ge=0,
        description="Messages one sender may send per minute (0: no limit; not the console).",
    )
    max_queued_messages: int = Field(
        20, ge=1, description="Freeform messages that may wait per session; more are refused."
    )
    max_concurrent_runs: int = Field(
        4, ge=1, description="Agent runs at once across all sessions; others wait in order."
    )
    confirm_timeout_s: int = Field(
        120, ge=1, description="How long a destructive command waits for `confirm`."
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On shutdown, runs get this long to finish before being cancelled."
    )

    @model_validator(mode="after")
    def _window_order(self) -> DispatcherConfig:
        if self.max_window_ms < self.coalesce_window_ms:
            raise ValueError(
                f"max_window_ms ({self.max_window_ms}) must be >= coalesce_window_ms "
                f"({self.coalesce_window_ms})"
            )
        return self


@overload
def _absolute(value: Path) -> Path: ...
@overload
def _absolute(value: list[Path]) -> list[Path]: ...
def _absolute(value: Path | list[Path]) -> Path | list[Path]:
    """``~`` expanded and made absolute against the directory podbay started in.

    Resolved once, when the settings are built: a relative path handed on later (a bind
    mount, a child's cwd) would mean something else, or nothing, to its reader.
    """
    if isinstance(value, list):
        return [p.expanduser().resolve() for p in value]
    return value.expanduser().resolve()


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+(?:[-+][0-9A-Za-z.-]+)?$")
_FILE_SUFFIX = "_FILE"


def _read_secret_file(key: str, raw: str) -> str:
    """The value of ``<key> = "<path>"``: the file's text minus one trailing newline.

    Errors name the key and the path, never the content.
    """
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise ValueError(f"{key}: expected an absolute path, got {raw!r}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{key}: {path} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise ValueError(f"{key}: {path} is empty")
    if "\0" in text:
        raise ValueError(f"{key}: {path} contains a NUL byte")
    return text


_ENV_OVERRIDE = "PODBAY_AGENT__ENV__"


def _override_names() -> dict[str, str]:
    """Lower-cased name -> name as written, of ``PODBAY_AGENT__ENV__<NAME>`` variables.

    pydantic-settings lower-cases environment keys, but the agent's variable names are
    case-sensitive (``ANTHROPIC_API_KEY``), so the spelling is taken from the environment.
    """
    size = len(_ENV_OVERRIDE)
    return {k[size:].lower(): k[size:] for k in os.environ if k.upper().startswith(_ENV_OVERRIDE)}


def _agent_env(value: Any) -> dict[str, str]:
    """``[agent.env]`` checked and resolved: names valid, ``NAME_FILE`` read into ``NAME``.

    Messages name the key; a value never appears in one (they are secrets).
    """
    if not isinstance(value, dict):
        raise ValueError('expected a table of NAME = "value" (e.g. [agent.env])')
    overrides = _override_names()
    entries: list[tuple[str, Any, bool]] = []
    for key, raw in value.items():
        from_env = isinstance(key, str) and key == key.lower() and key in overrides
        entries.append((overrides[key] if from_env else key, raw, from_env))
    # Environment overrides win over the file, like every other key.
    entries.sort(key=lambda entry: entry[2])
    resolved: dict[str, str] = {}
    source: dict[str, tuple[str, bool]] = {}
    for key, raw, from_env in entries:
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ValueError(
                f"{key!r}: an environment variable name is letters, digits and '_', "
                "not starting with a digit"
            )
        if key.upper().startswith("PODBAY_"):
            raise ValueError(
                f"{key}: PODBAY_* variables are podbay's own and are never passed to the agent"
            )
        if isinstance(raw, SecretStr):
            raw = raw.get_secret_value()
        if not isinstance(raw, str):
            raise ValueError(f"{key}: expected a string value (in quotes)")
        name = key
        if key.endswith(_FILE_SUFFIX) and len(key) > len(_FILE_SUFFIX):
            name = key[: -len(_FILE_SUFFIX)]
            text = _read_secret_file(key, raw)
        elif "\0" in raw:
            raise ValueError(f"{key}: the value contains a NUL byte")
        else:
            text = raw
        earlier = source.get(name)
        if earlier is not None and earlier[1] == from_env:
            raise ValueError(f"{key}: {earlier[0]} is given too; set only one of them")
        resolved[name] = text
        source[name] = (key, from_env)
    return resolved


class AgentConfig(_Section):
    preset: Literal["claude", "codex", "command"] = Field(
        "command",
        description='Agent kind: "claude" (Claude Code), "codex" (Codex CLI) or "command" '
        "(runs `command` with the prompt on stdin).",
    )
    where: Literal["container", "host"] = Field(
        "host",
        description='Where the agent runs: "container" (the default for claude and codex) or '
        '"host" (the default for command).',
    )
    version: str = Field(
        "",
        description='CLI version for claude or codex (e.g. "2.1.332"); empty means the '
        "version podbay was tested with.",
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Appended to the preset's argv."
    )
    permission_mode: str = Field(
        "bypassPermissions",
        description="claude's --permission-mode; the container is the sandbox.",
    )
    command: list[str] = Field(
        default_factory=list,
        description='argv of the agent for preset "command", e.g. ["my-agent", "--flag"]; '
        "empty means no agent.",
    )
    timeout_s: int = Field(3600, ge=1, description="A run is cancelled after this many seconds.")
    stop_grace_s: float = Field(
        1.5, ge=0, description="On stop, SIGKILL follows SIGTERM after this many seconds."
    )
    model: str = Field("", description="Model name passed to the CLI; empty means its default.")
    base_url: str = Field(
        "",
        description="Custom model endpoint (claude: ANTHROPIC_BASE_URL; codex: a model "
        "provider); empty means the vendor's.",
    )
    env: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='Environment of the agent\'s process only, e.g. ANTHROPIC_API_KEY = "…"; '
        'NAME_FILE = "/path" reads NAME from a file at start. PODBAY_* is refused.',
    )

    @model_validator(mode="before")
    @classmethod
    def _where_by_preset(cls, data: Any) -> Any:
        # The coding agents default to the container (their sandbox); a command keeps
        # today's behaviour on the host.
        if isinstance(data, dict) and data.get("where") is None:
            preset = data.get("preset", "command")
            data = {**data, "where": "container" if preset in ("claude", "codex") else "host"}
        return data

    @field_validator("env", mode="before")
    @classmethod
    def _resolve_env(cls, value: Any) -> dict[str, str]:
        return _agent_env(value)

    @field_validator("version")
    @classmethod
    def _exact_version(cls, value: str) -> str:
        # It names a directory under <data dir>/agents: an exact version, never a path.
        if value and not _VERSION.match(value):
            raise ValueError('expected an exact version like "2.1.332", or "" for the default')
        return value

    @field_validator("permission_mode")
    @classmethod
    def _one_word(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z]+", value):
            raise ValueError('expected one word, e.g. "bypassPermissions" or "acceptEdits"')
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError('expected an http(s) URL, e.g. "http://127.0.0.1:8080"')
        return value

    def resolved_env(self) -> dict[str, str]:
        """``[agent.env]`` as plain strings (``NAME_FILE`` entries already read into NAME).

        Secrets: pass them to the agent's process only, never to a log, row or reply.
        """
        return {name: secret.get_secret_value() for name, secret in self.env.items()}


class StoreConfig(_Section):
    retention_days: float = Field(
        30,
        ge=0,
        description="Inbox, run events and audit rows older than this are pruned (0: keep).",
    )
    prune_interval_s: float = Field(
        3600, gt=0, description="How often old rows are pruned (and once at start)."
    )


class HttpConfig(_Section):
    host: str = Field("127.0.0.1", description="Address of the webhook server (Slack, WhatsApp).")
    port: int = Field(8765, ge=0, le=65535, description="Port of the webhook server (0: any).")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Larger request bodies are refused with 413."
    )
    public_url: str = Field(
        "",
        description='URL the platforms reach the webhook server at, e.g. "https://bot.example.org".',
    )

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError('expected an http(s) URL, e.g. "https://bot.example.org"')
        return value.rstrip("/")


class ProjectsConfig(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    root: Path = Field(
        Path("~/podbay-projects"), description="Default parent directory of project sources."
    )
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Directories `--path` may point into; empty means just `root`.",
    )
    ssh_port_range: tuple[int, int] = Field(
        (2200, 2299), description="Ports (inclusive) handed to project sshds on 127.0.0.1."
    )

    @field_validator("root", "allowed_roots")
    @classmethod
    def _expand_paths(cls, value: Path | list[Path]) -> Path | list[Path]:
        return _absolute(value)

    @field_validator("ssh_port_range")
    @classmethod
    def _port_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not (1024 <= low <= high <= 65535):
            raise ValueError("expected [low, high] with 1024 <= low <= high <= 65535")
        return value

    def roots(self) -> list[Path]:
        return self.allowed_roots or [self.root]


class DockerConfig(_Section):
    network: Literal["bridge", "host"] = Field(
        "bridge",
        description='"bridge": network `podbay`, SSH published on 127.0.0.1 only; '
        '"host": sshd listens on 127.0.0.1 in the host network.',
    )
    base_image: str = Field("debian:bookworm-slim", description="FROM image of podbay-base.")
    stacks_dirs: list[Path] = Field(
        default_factory=list, description="Extra folders of stacks/<name>/ overlays."
    )
    name_prefix: str = Field("podbay-", description="Prefix of container and volume names.")
    extra_ca_certs: list[Path] = Field(
        default_factory=list,
        description="PEM files of extra CAs (a TLS-intercepting proxy) trusted in images.",
    )
    cpus: float = Field(
        2.0,
        ge=0.01,
        description="Default CPU limit per project (at most the Docker engine's CPUs are used).",
    )
    memory: str = Field("4g", description="Default memory limit per project (at least 6m).")
    pids_limit: int = Field(1024, ge=16, description="Process limit per project container.")
    ready_timeout_s: float = Field(60.0, gt=0, description="How long to wait for sshd.")
    reconcile_interval_s: float = Field(
        60.0, gt=0, description="How often containers are compared with the registry."
    )
    stats_interval_s: float = Field(
        30.0, gt=0, description="How often CPU and memory of containers are sampled."
    )

    @field_validator("stacks_dirs", "extra_ca_certs")
    @classmethod
    def _absolute_paths(cls, value: list[Path]) -> list[Path]:
        return _absolute(value)

    @field_validator("memory")
    @classmethod
    def _memory_docker_accepts(cls, value: str) -> str:
        # The same bounds as --memory, checked at start rather than at the first project.
        from podbay.engine.projects import parse_memory
        from podbay.errors import UserError

        try:
            parse_memory(value, "docker.memory")
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return value


class SshConfig(_Section):
    authorized_keys: list[str] = Field(
        default_factory=list,
        description="Public keys (one line each) installed in every project besides its own.",
    )


class GitConfig(_Section):
    user_name: str = Field("", description="Git author name in containers (else host git).")
    user_email: str = Field("", description="Git author email in containers (else host git).")
    clone_timeout_s: float = Field(300.0, gt=0, description="`--git` clones give up after this.")


_LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class LogConfig(_Section):
    max_bytes: int = Field(
        10_000_000, ge=1024, description="<data dir>/podbay.log is rotated at this size."
    )
    backups: int = Field(
        3, ge=0, description="Rotated logs kept (podbay.log.1 …); 0 truncates instead."
    )
    libraries_level: _LogLevel = Field(
        "WARNING",
        description="Lowest level logged from other libraries (nio, aiosqlite, docker …).",
    )


def _transports_model() -> type[Section]:
    """``[transports]``: one section per installed transport plugin."""
    fields: dict[str, Any] = {
        name: (plugin.config, Field(default_factory=plugin.config, description=plugin.summary))
        for name, plugin in discover().items()
    }
    model: type[Section] = create_model("TransportsConfig", __base__=Section, **fields)
    return model


if TYPE_CHECKING:
    TransportsConfig = Section
else:
    TransportsConfig = _transports_model()


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="PODBAY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    data_dir: Path = Field(
        DEFAULT_DATA_DIR, description="Database, keys and logs live here (or PODBAY_DATA_DIR)."
    )
    bot: BotConfig = Field(default_factory=BotConfig)
    access: AccessConfig = Field(default_factory=AccessConfig)
    dispatcher: DispatcherConfig = Field(default_factory=DispatcherConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    projects: ProjectsConfig = Field(default_factory=ProjectsConfig)
    docker: DockerConfig = Field(default_factory=DockerConfig)
    ssh: SshConfig = Field(default_factory=SshConfig)
    git: GitConfig = Field(default_factory=GitConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    transports: TransportsConfig = Field(default_factory=TransportsConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment must override it.
        return (env_settings, init_settings)

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return _absolute(value)

    def transport_config(self, name: str) -> TransportSection:
        """The ``[transports.<name>]`` section of an installed transport plugin."""
        section = getattr(self.transports, name, None)
        if not isinstance(section, TransportSection):
            raise ConfigError(f"no transport named {name!r} is installed")
        return section

    def secret_values(self) -> list[str]:
        """Every secret set anywhere in the configuration (for redaction)."""
        found: list[str] = []

        def walk(value: object) -> None:
            if isinstance(value, SecretStr):
                if value.get_secret_value():
                    found.append(value.get_secret_value())
            elif isinstance(value, BaseModel):
                for name in type(value).model_fields:
                    walk(getattr(value, name))
            elif isinstance(value, dict):
                for item in value.values():
                    walk(item)
            elif isinstance(value, list | tuple):
                for item in value:
                    walk(item)

        walk(self)
        return found


def _known_keys(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            return []
        annotation = current.model_fields[part].annotation
        current = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return list(current.model_fields) if current is not None else []


def _is_secret_key(loc: tuple[str | int, ...]) -> bool:
    """Whether ``loc`` names a SecretStr field (its value must not appear in an error)."""
    current: type[BaseModel] = Settings
    for part in loc:
        info = current.model_fields.get(str(part))
        if info is None:
            return False
        annotation = info.annotation
        if annotation is SecretStr:
            return True
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        current = annotation
    return False


def _describe(error: Any, source: str) -> str:
    loc: tuple[str | int, ...] = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(Settings, loc), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {key} ({source}){hint}"
    message = str(error["msg"]).removeprefix("Value error, ")
    shown = repr(value) if not isinstance(value, dict) else "(section)"
    if _is_secret_key(loc):
        shown = "(secret, not shown)"
    if loc[:2] == ("agent", "env"):
        # [agent.env] holds secrets: name the variable, never show a value.
        name, sep, rest = message.partition(": ")
        if sep and re.fullmatch(r"'?[^\s']*'?", name):
            return f"agent.env.{name.strip(chr(39))} ({source}): {rest}"
        return f"agent.env ({source}): {message}"
    return f"{key} = {shown} ({source}): {message}"


def load_settings(
    config_path: Path | None = None,
    *,
    data_dir: Path | None = None,
) -> tuple[Settings, Path | None]:
    """Load settings from a TOML file (optional) and the environment.

    The file is ``config_path``, else ``$PODBAY_CONFIG``, else ``~/.config/podbay/config.toml``
    when it exists. Returns the settings and the path actually read.
    """
    env = os.environ
    explicit = config_path or (Path(env["PODBAY_CONFIG"]) if env.get("PODBAY_CONFIG") else None)
    path = (explicit or DEFAULT_CONFIG_PATH).expanduser()
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    elif explicit is not None:
        raise ConfigError(f"config file {path} does not exist; create it with `podbay init`")
    read = path if path.exists() else None
    if data_dir is not None:
        data["data_dir"] = str(data_dir)
    source = str(path) if read else "defaults"
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        if any(str(k).startswith("PODBAY_") for k in env):
            source += " or PODBAY_* environment"
        problems = "\n".join(f"  - {_describe(err, source)}" for err in exc.errors())
        raise ConfigError(f"invalid configuration:\n{problems}") from exc
    if data_dir is not None:
        # An explicit --data-dir beats PODBAY_DATA_DIR (made absolute by the validator).
        settings.data_dir = data_dir
    return settings, read


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, Path):
        return _toml_value(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _sections(model: type[BaseModel], prefix: str) -> list[tuple[str, list[tuple[str, Any, str]]]]:
    own: list[tuple[str, Any, str]] = []
    nested: list[tuple[str, list[tuple[str, Any, str]]]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.extend(_sections(annotation, f"{prefix}{name}."))
            continue
        default = info.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            default = default.get_secret_value()  # a default is no secret (it is empty)
        own.append((name, default, info.description or ""))
    result = [(prefix.rstrip("."), own)] if own else []
    return result + nested


def config_reference() -> list[tuple[str, Any, str]]:
    """Every config key as (dotted key, default, description), in file order."""
    rows: list[tuple[str, Any, str]] = []
    for section, fields in _sections(Settings, ""):
        for name, default, description in fields:
            rows.append((f"{section}.{name}" if section else name, default, description))
    return rows


_TABLE_EXAMPLES = {
    "agent.env": [
        '# ANTHROPIC_API_KEY = "sk-ant-..."',
        '# ANTHROPIC_API_KEY_FILE = "/run/secrets/anthropic-key"',
        '# OPENAI_API_KEY_FILE = "/run/secrets/openai-key"',
    ],
}


def default_config_toml() -> str:
    """A commented TOML file listing every key with its default."""
    lines = [
        "# podbay configuration. Every key is shown with its default.",
        "# Environment variables override this file: PODBAY_<SECTION>__<KEY>, e.g.",
        "# PODBAY_DISPATCHER__COALESCE_WINDOW_MS=500.",
        "",
    ]
    for section, fields in _sections(Settings, ""):
        if section:
            lines.append(f"[{section}]")
        tables: list[tuple[str, str]] = []
        for name, default, description in fields:
            if isinstance(default, dict) and not default and section:
                # An empty table is written as its own [section.name] after the section's
                # keys, in the shape the README documents, so entries can be added under it.
                tables.append((name, description))
                continue
            if description:
                lines.append(f"# {description}")
            if name == "data_dir":
                lines.append(f"# {name} = {_toml_value(str(DEFAULT_DATA_DIR))}")
            elif f"{section}.{name}" == "agent.where":
                # Follows the preset unless set: pinning "host" here would keep a later
                # `preset = "claude"` out of the project's container.
                lines.append('# where = "container"  # default: container for claude/codex')
            else:
                lines.append(f"{name} = {_toml_value(default)}")
        lines.append("")
        for name, description in tables:
            lines.append(f"[{section}.{name}]")
            if description:
                lines.append(f"# {description}")
            lines.extend(_TABLE_EXAMPLES.get(f"{section}.{name}", []))
            lines.append("")
    return "\n".join(lines)


def identity_matches(pattern: str, identity: str) -> bool:
    """``"<transport>:*"`` matches every user of that transport; otherwise exact."""
    if pattern.endswith(":*"):
        return identity.startswith(pattern[:-1])
    return pattern == identity
