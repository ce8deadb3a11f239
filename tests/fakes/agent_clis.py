"""The real coding-agent CLIs for tests: Claude Code and Codex, installed once from npm.

``agent_clis()`` installs ``@anthropic-ai/claude-code`` and ``@openai/codex`` at the pinned
versions into ``~/.cache/podbay-tests/agent-clis/<versions>/`` (or
``$PODBAY_TEST_AGENT_CLI_CACHE``) with the host's ordinary npm configuration, and returns
the paths of the native binaries. Reruns find the cached install and take no time.

Both packages ship a self-contained native program in a platform package, so nothing here
needs node at run time and the postinstall scripts are skipped (``--ignore-scripts``):

- ``@anthropic-ai/claude-code-linux-x64/claude``: one glibc-linked executable;
- ``@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/``: a static musl ``bin/codex``
  that finds its helpers (``codex-path/rg``, ``codex-resources/bwrap``) relative to itself,
  so the whole ``x86_64-unknown-linux-musl`` directory is what to mount into a container.

The function blocks (npm takes ~10 s the first time): call it from a sync fixture or
through ``asyncio.to_thread``.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The versions podbay is tested with (``npm view <package> version`` when pinned).
CLAUDE_CODE_VERSION = "2.1.332"
CODEX_VERSION = "0.171.0"

CLAUDE_PACKAGE = "@anthropic-ai/claude-code"
CODEX_PACKAGE = "@openai/codex"
INSTALL_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class AgentClis:
    root: Path  # the npm prefix: root / "node_modules" / ...
    claude: Path  # the native claude executable
    codex: Path  # the native codex executable (inside codex_dir / "bin")
    codex_dir: Path  # codex's vendor directory: bin/, codex-path/, codex-resources/
    claude_version: str
    codex_version: str


def cache_root() -> Path:
    configured = os.environ.get("PODBAY_TEST_AGENT_CLI_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "podbay-tests" / "agent-clis"


def agent_clis(
    claude_version: str = CLAUDE_CODE_VERSION, codex_version: str = CODEX_VERSION
) -> AgentClis:
    """The installed CLIs at these versions, installing them first if needed."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError("the agent CLI tests need linux x86_64")
    prefix = cache_root() / f"claude-{claude_version}_codex-{codex_version}"
    found = _locate(prefix, claude_version, codex_version)
    if found is not None:
        return found
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # One installer at a time (parallel test processes share the cache).
    with open(prefix.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _locate(prefix, claude_version, codex_version)
        if found is not None:
            return found
        _install(prefix, claude_version, codex_version)
    found = _locate(prefix, claude_version, codex_version)
    if found is None:
        raise RuntimeError(f"npm install into {prefix} did not produce the native binaries")
    return found


def _locate(prefix: Path, claude_version: str, codex_version: str) -> AgentClis | None:
    modules = prefix / "node_modules"
    claude = _first_existing(
        modules / "@anthropic-ai" / "claude-code-linux-x64" / "claude",
        modules / "@anthropic-ai" / "claude-code-linux-x64-musl" / "claude",
    )
    codex_dir = modules / "@openai" / "codex-linux-x64" / "vendor" / "x86_64-unknown-linux-musl"
    codex = codex_dir / "bin" / "codex"
    if claude is None or not codex.is_file() or not (prefix / ".complete").is_file():
        return None
    return AgentClis(prefix, claude, codex, codex_dir, claude_version, codex_version)


def _first_existing(*paths: Path) -> Path | None:
    return next((path for path in paths if path.is_file()), None)


def _install(prefix: Path, claude_version: str, codex_version: str) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to install the agent CLIs for tests")
    staging = prefix.with_name(prefix.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    command = [
        npm,
        "install",
        "--prefix",
        str(staging),
        "--ignore-scripts",  # the native binaries need no postinstall
        "--no-audit",
        "--no-fund",
        "--no-save",
        "--loglevel=error",
        f"{CLAUDE_PACKAGE}@{claude_version}",
        f"{CODEX_PACKAGE}@{codex_version}",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"npm install failed ({result.returncode}): {result.stderr[-2000:]}")
    (staging / ".complete").write_text(f"{claude_version} {codex_version}\n")
    shutil.rmtree(prefix, ignore_errors=True)
    staging.rename(prefix)
