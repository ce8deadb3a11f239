"""``podbay`` command line: chat (default), run, init, doctor, status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.handlers
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from podbay import __version__
from podbay.bot import Podbay, database_path
from podbay.commands.status import render_status
from podbay.config import (
    DEFAULT_CONFIG_PATH,
    LogConfig,
    Settings,
    default_config_toml,
    load_settings,
)
from podbay.engine.core import Engine
from podbay.engine.docker import DockerProvisioner
from podbay.engine.lifecycle import ProjectManager
from podbay.engine.ssh import ssh_config_block
from podbay.engine.store import Store, backup_database
from podbay.errors import ConfigError, PodbayError, UserError
from podbay.redact import RedactingFormatter
from podbay.runtime import tune_collector
from podbay.supervisor import read_published
from podbay.transports.console import ConsoleTransport
from podbay.transports.plugins import discover
from podbay.transports.render import markdown_to_plain

log = logging.getLogger("podbay")


def _add_common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS lets the options go before or after the subcommand without one
    # position's default overwriting the other's value.
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="TOML config file (or PODBAY_CONFIG; default ~/.config/podbay/config.toml)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="data directory (or PODBAY_DATA_DIR; default ~/.local/share/podbay)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="podbay", description="Drive many coding projects from chat."
    )
    parser.add_argument("--version", action="version", version=f"podbay {__version__}")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subcommands = {
        "chat": "talk to podbay on this console (default)",
        "run": "serve every enabled transport until stopped",
        "init": "write a commented config file",
        "doctor": "check config, data dir, Docker and agent",
        "status": "print the status report",
        "images": "prebuild images: images build [--stack S | --all]",
        "trash": "list, restore or empty purged project sources",
        "ssh-config": "print an ~/.ssh/config block for every project",
        "backup": "write a consistent copy of the database: backup PATH",
    }
    for name, help_text in subcommands.items():
        child = sub.add_parser(name, help=help_text)
        _add_common(child)
        if name == "init":
            child.add_argument("--force", action="store_true", help="overwrite an existing file")
        elif name == "images":
            child.add_argument("action", choices=["build"])
            group = child.add_mutually_exclusive_group()
            group.add_argument("--stack", help="build the base image and this stack's image")
            group.add_argument("--all", action="store_true", help="build every stack's image")
        elif name == "trash":
            child.add_argument("action", nargs="?", choices=["list", "restore", "empty"])
            child.add_argument("entry", nargs="?", help="the entry to restore")
        elif name == "backup":
            child.add_argument("path", type=Path, help="the file to write (not overwritten)")
            child.add_argument("--force", action="store_true", help="overwrite PATH")
        elif name == "ssh-config":
            child.add_argument(
                "--write",
                action="store_true",
                help="write <data dir>/ssh_config for `Include` in ~/.ssh/config",
            )
    return parser


class _LibraryFilter(logging.Filter):
    """Passes podbay's own records, and other libraries' from ``level`` up.

    A filter as well as the root level: a library that sets its own logger's level (or a
    child logger's) would otherwise still reach the log file at INFO.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == "podbay" or record.name.startswith("podbay.")
        return own or record.levelno >= self.level


def _setup_logging(verbosity: int, data_dir: Path | None, config: LogConfig | None = None) -> None:
    """stderr gets warnings (-v: info, -vv: debug); <data dir>/podbay.log gets podbay's INFO
    and other libraries' ``log.libraries_level`` and up, rotated at ``log.max_bytes``."""
    config = config or LogConfig()
    level = logging.WARNING - 10 * min(verbosity, 2)
    # -vv asks for everything, the libraries' debug output included.
    libraries = logging.DEBUG if verbosity >= 2 else logging.getLevelName(config.libraries_level)
    own = min(level, logging.INFO) if data_dir else level
    root = logging.getLogger()
    root.setLevel(min(own, libraries))
    logging.getLogger("podbay").setLevel(own)
    only = _LibraryFilter(libraries)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(level)
    stderr.addFilter(only)
    stderr.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(stderr)
    if data_dir is not None:
        with contextlib.suppress(OSError):
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # delay: a command that logs nothing (status) neither creates nor touches it.
            file_handler = logging.handlers.RotatingFileHandler(
                data_dir / "podbay.log",
                maxBytes=config.max_bytes,
                backupCount=config.backups,
                encoding="utf-8",
                delay=True,
            )
            file_handler.setLevel(logging.INFO)
            file_handler.addFilter(only)
            file_handler.setFormatter(
                RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
            root.addHandler(file_handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "chat"
    config_path: Path | None = getattr(args, "config", None)
    if command == "init":
        return _init(config_path, force=args.force)
    try:
        settings, config_read = load_settings(config_path, data_dir=getattr(args, "data_dir", None))
    except ConfigError as exc:
        print(f"podbay: {exc}", file=sys.stderr)
        if command == "doctor":
            print("fix: edit the config file (or the PODBAY_* variable) named above.")
        return 2
    _setup_logging(
        getattr(args, "verbose", 0),
        settings.data_dir if command != "doctor" else None,
        settings.log,
    )
    try:
        if command == "chat":
            return asyncio.run(_chat(settings))
        if command == "run":
            return asyncio.run(_run(settings))
        if command == "doctor":
            return asyncio.run(_doctor(settings, config_read))
        if command == "status":
            return asyncio.run(_status(settings))
        if command == "images":
            return asyncio.run(_images(settings, args.stack, build_all=args.all))
        if command == "trash":
            return asyncio.run(_trash(settings, args.action or "list", args.entry))
        if command == "ssh-config":
            return asyncio.run(_ssh_config(settings, write=args.write))
        if command == "backup":
            return _backup(settings, args.path, force=args.force)
    except PodbayError as exc:
        print(f"podbay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(command)


def _backup(settings: Settings, path: Path, *, force: bool) -> int:
    """``podbay backup PATH``: SQLite's online backup, safe while podbay runs."""
    dest = path.expanduser().absolute()
    if dest.is_dir():
        dest = dest / f"podbay-{time.strftime('%Y%m%d-%H%M%S')}.db"
    if dest.exists() and not force:
        print(f"podbay: {dest} already exists; pass --force to overwrite it.", file=sys.stderr)
        return 1
    if not dest.parent.is_dir():
        print(f"podbay: {dest.parent} is not a directory; create it first.", file=sys.stderr)
        return 1
    try:
        pages = backup_database(database_path(settings), dest)
    except (OSError, sqlite3.Error) as exc:
        print(f"podbay: the backup to {dest} failed: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote a consistent copy of {database_path(settings)} to {dest} ({pages} pages).")
    print("To restore: stop podbay, replace the database file with the copy (remove its")
    print("-wal and -shm files), then start podbay again.")
    return 0


def _init(config_path: Path | None, *, force: bool) -> int:
    env_path = os.environ.get("PODBAY_CONFIG")
    path = (config_path or (Path(env_path) if env_path else DEFAULT_CONFIG_PATH)).expanduser()
    if path.exists() and not force:
        print(f"podbay: {path} already exists; pass --force to overwrite it.", file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written atomically and private: the file will soon hold platform tokens.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".podbay-", suffix=".toml")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(default_config_toml())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0


async def _chat(settings: Settings) -> int:
    console = ConsoleTransport()
    async with Podbay(settings, transports=[console]) as bot:
        assert bot.dispatcher is not None
        tune_collector()
        stop = _stop_event()
        waiter = asyncio.create_task(console.closed.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stopper):
            task.cancel()
        if console.closed.is_set() and not stop.is_set():
            # End of input: let queued and running work finish before exiting.
            drain = asyncio.create_task(bot.dispatcher.drain())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({drain, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not drain.done():
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
        if stop.is_set():
            bot.shutdown_grace_s = 0  # Ctrl-C means now: cancel runs instead of waiting
    return 0


async def _run(settings: Settings) -> int:
    bot = Podbay(settings)
    if not bot.transports:
        bot.transports.append(ConsoleTransport())
    transports = bot.transports
    async with bot:
        tune_collector()
        names = ", ".join(t.name for t in transports)
        log.info("podbay serving on: %s", names)
        stop = _stop_event()
        failed = asyncio.create_task(bot.supervisor.failed.wait())
        waits = {asyncio.create_task(stop.wait()), failed}
        if len(transports) == 1 and isinstance(transports[0], ConsoleTransport):
            waits.add(asyncio.create_task(transports[0].closed.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        # A transport that gave up (rejected credentials, a dead task) ends the run: a
        # podbay that hears nothing must not look alive to systemd or to its users.
        failures = bot.supervisor.failures()
        if failures:
            bot.shutdown_grace_s = min(bot.shutdown_grace_s, 5.0)
    for state in failures:
        print(f"podbay: transport {state.describe()}", file=sys.stderr)
    return 1 if failures else 0


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _status(settings: Settings) -> int:
    path = database_path(settings)
    if not path.exists():
        print(f"No podbay data in {settings.data_dir} yet. Start with `podbay chat`.")
        return 0
    provisioner = DockerProvisioner()
    try:
        # Read-only: status only looks, so it neither migrates nor waits on the running
        # podbay's write lock.
        async with await Store.open(path, read_only=True) as store:
            engine = Engine(store, settings, provisioner=provisioner)
            if engine.projects is not None:
                # This process has no background sampler; one-shot reads are quick, and a
                # slow engine costs at most the timeout (status then shows no figures).
                with contextlib.suppress(PodbayError):
                    await engine.projects.sample_stats(timeout_s=5.0)
            report = await engine.status()
    finally:
        await provisioner.close()
    # Transport states come from the running podbay (another process), if there is one.
    published = await asyncio.to_thread(read_published, settings.data_dir)
    transports = published.transports if published is not None else ()
    running = published is not None and published.running
    print(markdown_to_plain(render_status(report, transports=transports, serving=running)))
    return 0


async def _with_manager(settings: Settings, use: Callable[[ProjectManager], Awaitable[int]]) -> int:
    """Run ``use`` with a project manager over the store and the Docker engine."""
    provisioner = DockerProvisioner()
    try:
        async with await Store.open(database_path(settings)) as store:
            return await use(ProjectManager(store, settings, provisioner))
    finally:
        await provisioner.close()


async def _images(settings: Settings, stack: str | None, *, build_all: bool) -> int:
    async def use(manager: ProjectManager) -> int:
        stacks = list(manager.stacks())
        targets: list[str | None] = [None]
        if build_all:
            targets = list(stacks)
        elif stack is not None:
            if stack not in stacks:
                raise UserError(f"unknown stack {stack!r}; choose one of {', '.join(stacks)}")
            targets = [stack]

        async def say(text: str) -> None:
            print(text, flush=True)

        for target in targets:
            tag = await manager.ensure_image(target, say)
            print(f"ready: {tag}")
        return 0

    return await _with_manager(settings, use)


async def _trash(settings: Settings, action: str, entry: str | None) -> int:
    async def use(manager: ProjectManager) -> int:
        if action == "restore":
            if not entry:
                raise UserError("usage: podbay trash restore <entry> (see `podbay trash`)")
            print(f"restored to {await asyncio.to_thread(manager.trash_restore, entry)}")
        elif action == "empty":
            print(f"removed {await asyncio.to_thread(manager.trash_empty)} trash entries")
        else:
            entries = manager.trash_entries()
            for name, original in entries:
                print(f"{name}\t(was {original})")
            if not entries:
                print("The trash is empty.")
        return 0

    return await _with_manager(settings, use)


async def _ssh_config(settings: Settings, *, write: bool) -> int:
    async def use(manager: ProjectManager) -> int:
        # The blocks pin host keys through podbay's known_hosts: bring it up to date first.
        await manager.sync_known_hosts()
        blocks = [
            ssh_config_block(await manager.ssh_target(p))
            for p in await manager.store.project_list()
            if p.ssh_port is not None and p.state == "ready"
        ]
        text = "\n\n".join(blocks) + ("\n" if blocks else "")
        if not write:
            print(text or "# no projects yet", end="" if text else "\n")
            return 0
        target = settings.data_dir / "ssh_config"
        target.write_text(text)
        target.chmod(0o600)
        # ~/.ssh/config itself is never edited: the user adds the Include line.
        print(f"wrote {target}\nadd this line at the top of ~/.ssh/config:  Include {target}")
        return 0

    return await _with_manager(settings, use)


_AGENT_CREDENTIALS = {
    "claude": ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN"),
    "codex": ("OPENAI_API_KEY", "CODEX_API_KEY"),
}


def _check_agent(settings: Settings, problems: list[tuple[str, str]], notes: list[str]) -> None:
    """The configured agent: a host command on PATH, or the coding CLI podbay fetches."""
    from podbay.engine.agent_cli import AgentCliStore, resolve_version

    agent = settings.agent
    if agent.preset == "command":
        command = agent.command
        if not command:
            notes.append("no agent configured: freeform messages will explain how to set one")
        elif agent.where == "container":
            notes.append(
                f"agent command {command[0]!r} runs in the project container "
                "(its image must provide it)"
            )
        elif shutil.which(command[0]) is None:
            problems.append(
                (
                    f"agent command {command[0]!r} is not on PATH",
                    "install it, or fix `[agent] command` in the config",
                )
            )
        else:
            notes.append(f"agent command {command[0]!r} found")
        return
    name = agent.preset
    try:
        version = resolve_version(name, agent.version)
        store = AgentCliStore(settings.data_dir)
        cli = store.lookup(name, version)
        others = [c for c in store.installed() if (c.name, c.version) != (name, version)]
    except (UserError, OSError) as exc:
        problems.append((f"agent: {exc}", "fix `[agent] version` in the config"))
        return
    if cli is not None:
        notes.append(f"agent: {name} {version} installed at {cli.host_dir}")
    elif shutil.which("npm") is None:
        problems.append(
            (
                f"agent: {name} {version} is not fetched yet and npm is not on PATH",
                "install npm (e.g. `apt-get install npm`): podbay fetches the CLI with it "
                "on first use",
            )
        )
    else:
        notes.append(
            f"agent: {name} {version} not fetched yet; podbay fetches it on first use (npm found)"
        )
    if others:
        listed = ", ".join(f"{c.name} {c.version}" for c in others)
        notes.append(f"also in {settings.data_dir / 'agents'}: {listed}")
    if agent.where == "host":
        runs = (
            f"`[agent] command` ({agent.command[0]!r}) runs instead, on this host, unsandboxed"
            if agent.command
            else "no agent runs at all (`[agent] command` is not set)"
        )
        problems.append(
            (
                f"agent: {name} is set to run outside the project container, which podbay "
                f"does not do for {name}: {runs}",
                'set `[agent] where = "container"` (the default for claude and codex)',
            )
        )
    # Names only: the values are secrets.
    given = set(agent.resolved_env())
    wanted = _AGENT_CREDENTIALS.get(name, ())
    if not given.intersection(wanted):
        notes.append(
            f"[agent.env] sets none of {', '.join(wanted)}: {name} needs one, "
            "unless it was logged in inside the project"
        )


async def _doctor(settings: Settings, config_read: Path | None = None) -> int:
    problems: list[tuple[str, str]] = []
    notes: list[str] = []
    if config_read is not None:
        notes.append(f"config file {config_read}")
    else:
        notes.append(
            f"no config file: built-in defaults and PODBAY_* variables (`podbay init` writes "
            f"a commented one at {DEFAULT_CONFIG_PATH.expanduser()})"
        )
    _check_host_tools(problems, notes)
    data_dir = settings.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = data_dir / ".doctor-probe"
        probe.write_text("ok")
        probe.unlink()
        notes.append(f"data dir {data_dir} is writable")
    except OSError as exc:
        problems.append(
            (
                f"data dir {data_dir} is not writable ({exc.strerror})",
                "pass --data-dir DIR (or set PODBAY_DATA_DIR) to a directory you own",
            )
        )
    else:
        try:
            async with await Store.open(database_path(settings)) as store:
                notes.append(f"database schema v{await store.schema_version()}")
                registered = await store.ports_in_use()
        except PodbayError as exc:
            problems.append((f"database: {exc}", "move the database aside or upgrade podbay"))
        else:
            ports_problem, ports_note = await asyncio.to_thread(_check_ports, settings, registered)
            if ports_problem:
                problems.append(ports_problem)
            if ports_note:
                notes.append(ports_note)
    docker_problem = await asyncio.to_thread(_check_docker)
    if docker_problem:
        problems.append(docker_problem)
    else:
        notes.append("Docker engine reachable")
        cpus_problem, cpus_note = await asyncio.to_thread(_check_cpus, settings)
        if cpus_problem:
            problems.append(cpus_problem)
        if cpus_note:
            notes.append(cpus_note)
        image_problem, image_note = await asyncio.to_thread(_check_base_image, settings)
        if image_problem:
            problems.append(image_problem)
        if image_note:
            notes.append(image_note)
    _check_agent(settings, problems, notes)
    for name, plugin in discover().items():
        section = settings.transport_config(name)
        if section.enabled and plugin.doctor is not None:
            report = await plugin.doctor(settings, section)
            notes.extend(report.notes)
            problems.extend(report.problems)
    problems.extend(await _check_transports(settings, notes))
    for note in notes:
        print(f"ok: {note}")
    for problem, fix in problems:
        print(f"problem: {problem}\n  fix: {fix}")
    if problems:
        print(f"{len(problems)} problem(s) found.")
        return 1
    print("All checks passed.")
    return 0


async def _check_transports(settings: Settings, notes: list[str]) -> list[tuple[str, str]]:
    """The states a running podbay publishes for its transports (see podbay.supervisor)."""
    published = await asyncio.to_thread(read_published, settings.data_dir)
    if published is None or not published.running:
        if any(
            settings.transport_config(name).enabled and name != "console" for name in discover()
        ):
            notes.append("podbay is not running: `podbay run` reports transport states here")
        return []
    problems: list[tuple[str, str]] = []
    for state in published.transports:
        if state.local:
            continue
        if state.status == "reconnecting":
            problems.append(
                (
                    f"transport {state.describe()}",
                    "podbay keeps retrying with backoff; check that the server is up and "
                    "reachable from this host",
                )
            )
        elif state.status == "failed":
            problems.append(
                (f"transport {state.describe()}", "fix the cause above, then restart podbay")
            )
        else:
            notes.append(f"transport {state.describe()}")
    return problems


# Host programs podbay runs itself, and why (for the doctor's line when one is missing).
_HOST_TOOLS = (
    ("git", "`--git` clones and the project summaries", "install git (e.g. `apt-get install git`)"),
    (
        "ssh-keygen",
        "each project's SSH keys",
        "install openssh-client (e.g. `apt-get install openssh-client`)",
    ),
    (
        "ssh",
        "the printed `ssh` command you log in with",
        "install openssh-client (e.g. `apt-get install openssh-client`)",
    ),
)


def _check_host_tools(problems: list[tuple[str, str]], notes: list[str]) -> None:
    missing = [(tool, why, fix) for tool, why, fix in _HOST_TOOLS if shutil.which(tool) is None]
    for tool, why, fix in missing:
        problems.append((f"`{tool}` is not on PATH; podbay needs it for {why}", fix))
    if not missing:
        notes.append("git, ssh and ssh-keygen found")


def _check_ports(settings: Settings, registered: set[int]) -> tuple[tuple[str, str] | None, str]:
    """Ports of ``projects.ssh_port_range`` neither given to a project nor bound on this host."""
    from podbay.engine.ssh import port_is_free

    low, high = settings.projects.ssh_port_range
    total = high - low + 1
    free = sum(1 for port in range(low, high + 1) if port not in registered and port_is_free(port))
    if free == 0:
        return (
            f"no free SSH port left in projects.ssh_port_range {low}-{high} "
            f"({len(registered & set(range(low, high + 1)))} given to projects, the rest in "
            "use on this host): `new project` would fail",
            "widen `projects.ssh_port_range` in the config, or delete a project you no longer need",
        ), ""
    return None, f"SSH ports {low}-{high}: {free} of {total} free"


def _check_base_image(settings: Settings) -> tuple[tuple[str, str] | None, str]:
    """podbay-base for this config: present, or buildable from its FROM image."""
    from docker.client import DockerClient
    from docker.errors import ImageNotFound

    from podbay.engine.stacks import base_image_spec, dev_ids

    cfg = settings.docker
    uid, gid = dev_ids()
    try:
        spec = base_image_spec(cfg.base_image, uid, gid, cfg.extra_ca_certs)
    except OSError as exc:
        return (
            f"cannot read a file of `docker.extra_ca_certs`: {exc.filename}: {exc.strerror}",
            "fix the path in `docker.extra_ca_certs`",
        ), ""
    try:
        client = DockerClient.from_env(timeout=10)
        try:

            def exists(name: str) -> bool:
                try:
                    client.images.get(name)
                except ImageNotFound:
                    return False
                return True

            if exists(spec.tag):
                return None, f"base image {spec.tag} present"
            if exists(cfg.base_image):
                return None, (
                    f"base image {spec.tag} is built on the first `new project` from "
                    f"{cfg.base_image} (present)"
                )
        finally:
            client.close()
    except Exception:
        return None, ""  # _check_docker already reports an unreachable engine
    return (
        f"podbay-base cannot be built: its FROM image {cfg.base_image} "
        "(`docker.base_image`) is not in the Docker engine",
        "run ./scripts/ensure-docker (it builds debian:bookworm-slim offline with "
        f"debootstrap), `docker pull {cfg.base_image}`, or set `docker.base_image` to an "
        "image you have",
    ), ""


def _check_cpus(settings: Settings) -> tuple[tuple[str, str] | None, str]:
    """docker.cpus against the engine's CPUs (the engine may be another machine).

    A default above the host is clamped at use (a note); a configured one is a problem.
    """
    from docker.client import DockerClient

    cpus = settings.docker.cpus
    try:
        client = DockerClient.from_env(timeout=5)
        try:
            host = int(client.info().get("NCPU") or 1)
        finally:
            client.close()
    except Exception:
        return None, ""  # _check_docker already reports an unreachable engine
    if cpus <= host:
        return None, f"docker.cpus = {cpus:g} fits the Docker engine's {host} CPUs"
    if "cpus" in settings.docker.model_fields_set:
        return (
            f"docker.cpus = {cpus:g} is more than the Docker engine's {host} CPUs",
            f"set `docker.cpus` to at most {host} (projects are limited to {host} meanwhile)",
        ), ""
    return None, (
        f"the default docker.cpus = {cpus:g} is more than the Docker engine's {host} CPUs; "
        f"projects get {host} (set `docker.cpus` to silence this)"
    )


def _check_docker() -> tuple[str, str] | None:
    try:
        from docker.client import DockerClient

        client = DockerClient.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return (
            f"Docker engine not reachable at {host}: {reason}",
            "start dockerd (e.g. `sudo systemctl start docker`) or set DOCKER_HOST",
        )
    return None
