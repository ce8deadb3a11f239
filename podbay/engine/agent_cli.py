"""The coding-agent CLIs (Claude Code, Codex), fetched once from npm into the data dir.

Both npm packages ship a self-contained native program in a per-platform package, so
containers need neither node nor the postinstall script:

- ``@anthropic-ai/claude-code-linux-x64`` holds ``claude``, one glibc-linked executable;
- ``@openai/codex@<version>-linux-x64`` holds ``vendor/x86_64-unknown-linux-musl/``: a
  static ``bin/codex`` that finds its helpers (``codex-path/rg``, ``codex-resources/``)
  relative to itself, so the whole directory is kept.

Each lands in ``<data dir>/agents/<name>/<version>/`` and containers get ``<data
dir>/agents`` bind-mounted read-only at :data:`CONTAINER_ROOT`: one copy serves every
project, and a version change rebuilds no image. An install is staged in
``agents/.tmp-*`` and renamed into place when complete, so a version directory either
is whole or does not exist. The files are written by podbay's own user and mounted
read-only, so nothing the container runs can change what later runs execute.

npm runs with the host's own configuration (registry, proxy, CA), never a registry
named here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import re
import secrets
import shutil
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from podbay.engine.procs import ProcessTracker
from podbay.errors import UserError
from podbay.redact import redact

log = logging.getLogger(__name__)

AgentName = Literal["claude", "codex"]
Progress = Callable[[str], Awaitable[None]]

CONTAINER_ROOT = "/opt/podbay/agents"
# The versions podbay is tested with; `agent.version = ""` means these.
DEFAULT_VERSIONS: dict[str, str] = {"claude": "2.1.332", "codex": "0.171.0"}
NPM_TIMEOUT_S = 600.0

_MARKER = ".podbay-agent.json"
_TMP_PREFIX = ".tmp-"
_VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+(?:[-+][0-9A-Za-z.-]+)?$")
_STDERR_LINES = 6


@dataclass(frozen=True)
class AgentCli:
    """One installed CLI: ``host_dir / binary`` on the host, :attr:`container_path` inside."""

    name: str
    version: str
    host_dir: Path  # <data dir>/agents/<name>/<version>
    binary: str  # relative to host_dir, e.g. "claude" or "bin/codex"

    @property
    def host_path(self) -> Path:
        return self.host_dir / self.binary

    @property
    def container_dir(self) -> str:
        return f"{CONTAINER_ROOT}/{self.name}/{self.version}"

    @property
    def container_path(self) -> str:
        return f"{self.container_dir}/{self.binary}"


def agents_root(data_dir: Path) -> Path:
    """``<data dir>/agents``, created 0755 (whatever the umask) when missing.

    Containers bind-mount it, so it must exist before one is created: Docker would make a
    missing source itself, owned by root.
    """
    root = data_dir / "agents"
    _mkdir_0755(root)
    return root


def _mkdir_0755(path: Path) -> None:
    if not path.is_dir():
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(path, 0o755)


def container_path(cli: AgentCli) -> str:
    """Where ``cli``'s executable is inside a project container."""
    return cli.container_path


@dataclass(frozen=True)
class _Platform:
    package: str  # npm spec without the version, e.g. "@anthropic-ai/claude-code-linux-x64"
    version_suffix: str  # codex publishes platforms as versions: "0.171.0-linux-x64"
    source: str  # what to keep, relative to node_modules/<package name>
    binary: str  # the executable, relative to the kept directory (or the file itself)


def _platform(name: str) -> _Platform:
    machine = platform.machine().lower()
    if platform.system() != "Linux" or machine not in ("x86_64", "amd64", "aarch64", "arm64"):
        raise UserError(
            f"podbay can fetch {name} only for Linux on x86_64 or arm64, not "
            f'{platform.system()} {platform.machine()}; use `[agent] preset = "command"` '
            "with a CLI you install yourself"
        )
    arm = machine in ("aarch64", "arm64")
    arch, triple = ("arm64", "aarch64") if arm else ("x64", "x86_64")
    if name == "claude":
        # glibc build: project images derive from Debian.
        return _Platform(f"@anthropic-ai/claude-code-linux-{arch}", "", "claude", "claude")
    if name == "codex":
        return _Platform(
            "@openai/codex",
            f"-linux-{arch}",
            f"vendor/{triple}-unknown-linux-musl",
            "bin/codex",
        )
    raise UserError(f'unknown agent CLI {name!r}; expected "claude" or "codex"')


def resolve_version(name: str, version: str = "") -> str:
    """``version``, or the tested default for ``name`` when empty; refuses anything else."""
    chosen = version or DEFAULT_VERSIONS.get(name, "")
    if not chosen:
        raise UserError(f'unknown agent CLI {name!r}; expected "claude" or "codex"')
    if not _VERSION.match(chosen):
        raise UserError(
            f"agent.version = {chosen!r}: expected an exact version like "
            f'"{DEFAULT_VERSIONS.get(name, "1.2.3")}"'
        )
    return chosen


class AgentCliStore:
    """Fetches and finds the agent CLIs under ``<data dir>/agents``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        npm: str = "npm",
        procs: ProcessTracker | None = None,
        timeout_s: float = NPM_TIMEOUT_S,
    ) -> None:
        self.root = data_dir / "agents"
        self.npm = npm
        self.procs = procs
        self.timeout_s = timeout_s
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def lookup(self, name: str, version: str = "") -> AgentCli | None:
        """The installed CLI, or None when it has not been fetched yet (no npm, no I/O but stat)."""
        version = resolve_version(name, version)
        return _read_marker(self.root / name / version)

    def installed(self) -> list[AgentCli]:
        """Every complete install, sorted by name and version (for `podbay doctor`)."""
        found: list[AgentCli] = []
        if not self.root.is_dir():
            return found
        for name_dir in sorted(self.root.iterdir()):
            if name_dir.name.startswith(".") or not name_dir.is_dir():
                continue
            for version_dir in sorted(name_dir.iterdir()):
                cli = _read_marker(version_dir)
                if cli is not None:
                    found.append(cli)
        return found

    async def ensure(
        self, name: str, version: str = "", progress: Progress | None = None
    ) -> AgentCli:
        """The CLI ``name`` at ``version`` ("" = the tested default), fetched on first use.

        Concurrent calls for the same CLI install it once; later calls cost a stat.
        """
        version = resolve_version(name, version)
        cli = await asyncio.to_thread(_read_marker, self.root / name / version)
        if cli is not None:
            return cli
        lock = self._locks.setdefault((name, version), asyncio.Lock())
        if lock.locked() and progress is not None:
            # Another run is fetching it right now: this one waits for that, and says so.
            await progress(f"Fetching {name} {version} from npm (first use only; cached)…")
            progress = None
        async with lock:
            cli = await asyncio.to_thread(_read_marker, self.root / name / version)
            if cli is not None:
                return cli
            return await self._install(name, version, progress)

    async def _install(self, name: str, version: str, progress: Progress | None) -> AgentCli:
        plat = _platform(name)
        spec = f"{plat.package}@{version}{plat.version_suffix}"
        if progress is not None:
            await progress(f"Fetching {name} {version} from npm (first use only; cached)…")
        log.info("installing %s into %s", spec, self.root)
        staging = await asyncio.to_thread(self._staging, name, version)
        try:
            await self._npm_install(spec, name, version, staging / "npm")
            cli = await asyncio.to_thread(self._place, plat, spec, name, version, staging)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
        log.info("installed %s %s at %s", name, version, cli.host_dir)
        return cli

    def _staging(self, name: str, version: str) -> Path:
        agents_root(self.root.parent)
        _remove_abandoned(self.root)
        staging = self.root / f"{_TMP_PREFIX}{name}-{version}-{os.getpid()}-{secrets.token_hex(4)}"
        (staging / "npm").mkdir(mode=0o755, parents=True)
        return staging

    async def _npm_install(self, spec: str, name: str, version: str, prefix: Path) -> None:
        argv = [
            self.npm,
            "install",
            "--prefix",
            str(prefix),
            "--ignore-scripts",  # the native binary needs no postinstall; run nothing
            "--no-audit",
            "--no-fund",
            "--no-save",
            "--no-package-lock",
            "--loglevel=error",
            spec,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
        env["npm_config_update_notifier"] = "false"
        try:
            if self.procs is not None:
                done = await self.procs.run(
                    *argv,
                    kind="npm",
                    detail=f"npm install {spec}",
                    cwd=prefix,
                    env=env,
                    timeout_s=self.timeout_s,
                )
                code, err = done.returncode, done.stderr
            else:
                code, err = await _run(argv, prefix, env, self.timeout_s)
        except FileNotFoundError:
            raise UserError(
                f"cannot fetch {name} {version}: `{self.npm}` is not on PATH. Install npm "
                '(e.g. `apt-get install npm`), or use `[agent] preset = "command"`'
            ) from None
        except TimeoutError:
            raise UserError(
                f"npm install {spec} did not finish within {int(self.timeout_s)} s; "
                "check the network and npm's registry/proxy configuration"
            ) from None
        if code != 0:
            raise UserError(_npm_failure(spec, name, version, code, err))

    def _place(
        self, plat: _Platform, spec: str, name: str, version: str, staging: Path
    ) -> AgentCli:
        package_name = plat.package
        source = staging / "npm" / "node_modules" / package_name / plat.source
        # The kept directory: claude's single file goes into a directory of its own.
        if plat.source == plat.binary:
            if not source.is_file():
                raise UserError(_missing(spec, plat.source))
            kept = staging / "out"
            kept.mkdir(mode=0o755)
            source.rename(kept / plat.binary)
        else:
            if not (source / plat.binary).is_file():
                raise UserError(_missing(spec, f"{plat.source}/{plat.binary}"))
            kept = staging / "out"
            source.rename(kept)
        _tighten(kept)
        cli = AgentCli(name, version, self.root / name / version, plat.binary)
        (kept / _MARKER).write_text(
            json.dumps({"name": name, "version": version, "package": spec, "binary": plat.binary})
            + "\n"
        )
        os.chmod(kept / _MARKER, 0o644)
        _mkdir_0755(self.root / name)
        try:
            kept.rename(cli.host_dir)
        except OSError:
            # Another podbay finished the same install first: keep the complete one.
            existing = _read_marker(cli.host_dir)
            if existing is None:
                raise
            return existing
        return cli


async def _run(
    argv: list[str], cwd: Path, env: dict[str, str], timeout_s: float
) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout_s):
            _, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            os.killpg(proc.pid, 9)
            await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, err


def _npm_failure(spec: str, name: str, version: str, code: int, stderr: bytes) -> str:
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    # npm ends with "A complete log of this run can be found in: ..."; the cause is above.
    lines = [ln for ln in lines if "complete log of this run" not in ln]
    said = redact("\n".join(lines[-_STDERR_LINES:]))[-1200:] or f"(exit status {code})"
    default = DEFAULT_VERSIONS.get(name, "")
    return (
        f"cannot fetch {name} {version}: `npm install {spec}` failed:\n{said}\n"
        f'Fix: set `[agent] version` to a published version (or "" for {default}), '
        "and check that npm reaches its registry (network, proxy, `npm config get registry`)."
    )


def _missing(spec: str, what: str) -> str:
    return (
        f"npm installed {spec} but it has no {what}; this version's layout is not one podbay "
        'knows. Set `[agent] version` to a version podbay was tested with (or "").'
    )


def _tighten(top: Path) -> None:
    """Directories 0755, files 0755 when executable else 0644: nobody but podbay writes."""
    for dirpath, _dirnames, filenames in os.walk(top):
        os.chmod(dirpath, 0o755)
        for entry in filenames:
            path = os.path.join(dirpath, entry)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                continue  # resolved inside the read-only mount; chmod would follow it
            os.chmod(path, 0o755 if mode & 0o111 else 0o644)


def _read_marker(version_dir: Path) -> AgentCli | None:
    try:
        data = json.loads((version_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    name, version, binary = data.get("name"), data.get("version"), data.get("binary")
    if not (isinstance(name, str) and isinstance(version, str) and isinstance(binary, str)):
        return None
    if (name, version) != (version_dir.parent.name, version_dir.name):
        return None
    cli = AgentCli(name, version, version_dir, binary)
    return cli if cli.host_path.is_file() else None


def _remove_abandoned(root: Path) -> None:
    """Staging directories of installs whose podbay process is gone (crash, kill -9)."""
    for entry in root.iterdir():
        if not entry.name.startswith(_TMP_PREFIX):
            continue
        parts = entry.name.split("-")
        pid = int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None
        if pid is not None and pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)
