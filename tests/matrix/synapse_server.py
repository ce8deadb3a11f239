"""A real Synapse homeserver for tests: SQLite, 127.0.0.1 only, no federation.

``SynapseServer`` runs ``python -m synapse.app.homeserver`` (``matrix-synapse`` from PyPI,
installed in the test venv) as a child process of the test interpreter. It never reaches
another host: the only listener is a client-API HTTP listener on 127.0.0.1, there are no
trusted key servers, outbound federation is limited to an empty allow-list, and URL
previews, push, metrics, stats reporting and identity-server lookups are all off.

The object is not tied to an event loop: the child is a plain ``subprocess.Popen`` driven
through ``asyncio.to_thread`` and every HTTP call opens its own aiohttp session, so a
module-scoped server may be started on one loop and stopped on another.

    async with SynapseServer() as server:
        alice = await server.register("alice", "secret")
        client = nio.AsyncClient(server.url, alice)
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
_POLL_INTERVAL_S = 0.1
_START_ATTEMPTS = 3  # a new port each time, should another process take the free one

# Effectively no rate limit: tests register, log in, create rooms and send in bursts.
_UNLIMITED = {"per_second": 10_000, "burst_count": 100_000}

# Servers started by this process and not stopped yet: killed at interpreter exit, so
# an aborted test run leaves no homeserver behind.
_RUNNING: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_RUNNING):
        if process.poll() is None:
            process.kill()
            process.wait()
    _RUNNING.clear()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_environment(directory: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        # The test run's warning and debug switches are for the tests, not for Synapse.
        if key not in {"PYTHONWARNINGS", "PYTHONDEVMODE", "PYTHONTRACEMALLOC", "PYTHONASYNCIODEBUG"}
    }
    # Synapse works out a git-aware version string by running git in its install
    # directory; when the venv sits inside the project's checkout, ``git describe
    # --dirty`` would refresh (write) the project's index. Point git at nothing.
    env["GIT_DIR"] = str(directory / "no-such-git-dir")
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class SynapseError(RuntimeError):
    """Synapse did not start, or an admin API call failed."""


class SynapseServer:
    """One Synapse homeserver process on 127.0.0.1 with its own SQLite database.

    ``directory`` holds the config, keys, database, media and logs; by default a fresh
    temporary directory that ``stop()`` removes (a directory passed in is left in place).
    """

    def __init__(self, directory: Path | None = None, *, server_name: str = "localhost") -> None:
        self._given_directory = directory
        self._directory: Path | None = None
        self._server_name = server_name
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._shared_secret = secrets.token_hex(32)
        self.startup_seconds: float | None = None

    # -- properties -------------------------------------------------------------------

    @property
    def server_name(self) -> str:
        return self._server_name

    @property
    def port(self) -> int:
        if self._port is None:
            raise SynapseError("Synapse is not running")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def directory(self) -> Path:
        if self._directory is None:
            raise SynapseError("Synapse is not running")
        return self._directory

    @property
    def log_path(self) -> Path:
        return self.directory / "homeserver.log"

    @property
    def stderr_path(self) -> Path:
        return self.directory / "stderr.log"

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self._server_name}"

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> SynapseServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._process is not None:
            raise SynapseError("Synapse is already running")
        began = time.monotonic()
        if self._given_directory is not None:
            self._directory = self._given_directory
            await asyncio.to_thread(self._directory.mkdir, parents=True, exist_ok=True)
        else:
            self._directory = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="synapse-"))
        try:
            for attempt in range(1, _START_ATTEMPTS + 1):
                self._port = await asyncio.to_thread(_free_port)
                await asyncio.to_thread(self._write_config)
                await self._spawn()
                try:
                    await self._wait_until_ready()
                    break
                except SynapseError:
                    log = await asyncio.to_thread(self._logs)
                    await self._terminate()
                    if attempt < _START_ATTEMPTS and "Address already in use" in log:
                        continue
                    raise
        except BaseException:
            await self._terminate()
            await self._remove_directory()
            raise
        self.startup_seconds = time.monotonic() - began

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_GRACE_S, then remove the temporary directory."""
        await self._terminate()
        await self._remove_directory()

    async def pause(self) -> None:
        """Stop the homeserver process (an outage) but keep its port, database and keys."""
        if self._process is None:
            raise SynapseError("Synapse is not running")
        await self._terminate()

    async def resume(self) -> None:
        """Start the paused homeserver again: same port, same database, same users."""
        if self._process is not None:
            raise SynapseError("Synapse is already running")
        if self._directory is None or self._port is None:
            raise SynapseError("Synapse was never started")
        await self._spawn()
        try:
            await self._wait_until_ready()
        except BaseException:
            await self._terminate()
            raise

    async def _spawn(self) -> None:
        def spawn() -> subprocess.Popen[bytes]:
            with open(self.stderr_path, "wb") as output:
                return subprocess.Popen(
                    [sys.executable, "-m", "synapse.app.homeserver", "-c", "homeserver.yaml"],
                    cwd=self.directory,
                    env=_child_environment(self.directory),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    # Its own process group: a Ctrl-C at the terminal reaches pytest only,
                    # and stop() shuts Synapse down in order.
                    start_new_session=True,
                )

        self._process = await asyncio.to_thread(spawn)
        _RUNNING.add(self._process)

    async def _wait_until_ready(self) -> None:
        process = self._process
        assert process is not None
        url = f"{self.url}/_matrix/client/versions"
        deadline = time.monotonic() + START_TIMEOUT_S
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if process.poll() is not None:
                    raise SynapseError(
                        f"Synapse exited with status {process.returncode} while starting\n"
                        + await asyncio.to_thread(self._logs)
                    )
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise SynapseError(
                        f"Synapse did not answer {url} within {START_TIMEOUT_S:.0f} s\n"
                        + await asyncio.to_thread(self._logs)
                    )
                await asyncio.sleep(_POLL_INTERVAL_S)

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(process.wait, STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    await asyncio.to_thread(process.wait)
        finally:
            _RUNNING.discard(process)

    async def _remove_directory(self) -> None:
        directory, self._directory = self._directory, None
        if directory is not None and self._given_directory is None:
            await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)

    def _logs(self) -> str:
        return (
            f"--- {self.stderr_path} (tail) ---\n{_tail(self.stderr_path)}\n"
            f"--- {self.log_path} (tail) ---\n{_tail(self.log_path)}"
        )

    # -- configuration ----------------------------------------------------------------

    def _write_config(self) -> None:
        directory = self.directory
        key_path = directory / "signing.key"
        if not key_path.exists():
            # The format Synapse's --generate-keys writes: algorithm, key id, unpadded
            # base64 of the 32-byte ed25519 seed.
            seed = base64.b64encode(os.urandom(32)).decode().rstrip("=")
            key_path.write_text(f"ed25519 a_test {seed}\n")
        (directory / "media").mkdir(exist_ok=True)
        (directory / "log.yaml").write_text(json.dumps(self._log_config(), indent=2))
        # JSON is YAML: no YAML library needed in the test process.
        (directory / "homeserver.yaml").write_text(json.dumps(self._config(), indent=2))

    def _log_config(self) -> dict[str, Any]:
        return {
            "version": 1,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                    " - %(request)s - %(message)s"
                }
            },
            "filters": {"context": {"()": "synapse.logging.context.LoggingContextFilter"}},
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "filename": str(self.log_path),
                    "formatter": "precise",
                    "filters": ["context"],
                    "encoding": "utf8",
                }
            },
            "root": {"level": "WARNING", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }

    def _config(self) -> dict[str, Any]:
        directory = self.directory
        return {
            "server_name": self._server_name,
            "public_baseurl": f"{self.url}/",
            "signing_key_path": str(directory / "signing.key"),
            "log_config": str(directory / "log.yaml"),
            "media_store_path": str(directory / "media"),
            "database": {
                "name": "sqlite3",
                "args": {"database": str(directory / "homeserver.db")},
            },
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            # Registration: open, plus the shared-secret admin API that register() uses.
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "registration_shared_secret": self._shared_secret,
            "macaroon_secret_key": secrets.token_hex(32),
            "form_secret": secrets.token_hex(32),
            "bcrypt_rounds": 4,  # fast password hashing
            # Never talk to another host.
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "federation_domain_whitelist": [],
            "allow_public_rooms_over_federation": False,
            "report_stats": False,
            "enable_metrics": False,
            "url_preview_enabled": False,
            "enable_3pid_lookup": False,
            "push": {"enabled": False},
            "serve_server_wellknown": False,
            # No rate limits worth the name.
            "rc_message": _UNLIMITED,
            "rc_registration": _UNLIMITED,
            "rc_registration_token_validity": _UNLIMITED,
            "rc_login": {
                "address": _UNLIMITED,
                "account": _UNLIMITED,
                "failed_attempts": _UNLIMITED,
            },
            "rc_admin_redaction": _UNLIMITED,
            "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
            "rc_joins_per_room": _UNLIMITED,
            "rc_3pid_validation": _UNLIMITED,
            "rc_invites": {
                "per_room": _UNLIMITED,
                "per_user": _UNLIMITED,
                "per_issuer": _UNLIMITED,
            },
            "rc_third_party_invite": _UNLIMITED,
            "rc_media_create": _UNLIMITED,
            "rc_presence": {"per_user": _UNLIMITED},
            "rc_delayed_event_mgmt": _UNLIMITED,
            "rc_room_creation": _UNLIMITED,
            "rc_reports": _UNLIMITED,
            "rc_user_directory": _UNLIMITED,
            "rc_profile": _UNLIMITED,
            "rc_key_requests": _UNLIMITED,
        }

    # -- admin API --------------------------------------------------------------------

    async def register(self, localpart: str, password: str, admin: bool = False) -> str:
        """Create a user through the shared-secret registration API; returns its user id."""
        url = f"{self.url}/_synapse/admin/v1/register"
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url) as response:
                body = await response.json()
                if response.status != 200:
                    raise SynapseError(f"GET {url}: {response.status} {body}")
                nonce = body["nonce"]
            signed = "\x00".join((nonce, localpart, password, "admin" if admin else "notadmin"))
            mac = hmac.new(self._shared_secret.encode(), signed.encode(), hashlib.sha1)
            payload = {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            }
            async with session.post(url, json=payload) as response:
                body = await response.json()
                if response.status != 200:
                    raise SynapseError(f"registering {localpart!r}: {response.status} {body}")
        return str(body["user_id"])
