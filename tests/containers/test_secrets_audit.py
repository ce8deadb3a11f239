"""Secrets audit (issue 14): one podbay with every kind of secret, then a search for each.

One podbay, wired as `podbay run` wires it (the real transport plugins, the real Docker
engine, the real Claude Code CLI in the project's container), is configured with a unique
value for every secret it knows: the agent's ``ANTHROPIC_API_KEY``, the Slack bot token and
signing secret, the WhatsApp (Meta) app secret, access token and verify token, and the
Matrix bot password (a real Synapse on 127.0.0.1). A project is created from an HTTPS git
remote with ``--token <push token>`` in a private WhatsApp chat, a claude turn runs (the
fake Anthropic API scripts a model that runs ``echo`` and ``printenv ANTHROPIC_API_KEY`` and
then repeats its key), and commands and error paths (forged signatures, a wrong verify token,
typos, a refused remote, a token in a shared channel) go through each transport. podbay
refuses file:// remotes, so the remote is a dumb-protocol git server over HTTPS on 127.0.0.1
that wants the push token, which proves the token was used.

Afterwards each value is searched for in every log record (raw, at DEBUG, for the whole
test), in what a real run writes (``podbay.cli._setup_logging``: stderr at -vv and
``<data dir>/podbay.log``), in every row of every table of the database, in every reply
(every call the Slack and Graph fakes recorded, every notice the Matrix user sees, every
answer of the webhook server) and in ``docker inspect`` of the project container. Nothing
may be found. The fakes prove each secret was really used, so the search can fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import json
import logging
import secrets
import sqlite3
import ssl
import subprocess
import sys
import threading
import traceback
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from docker_support import local_ca_certs, remove_instance_containers
from fakes import anthropic_api as claude_api
from fakes.slack_api import FakeSlack, SlackCall
from fakes.whatsapp_api import FakeGraph
from nio import AsyncClient, RoomCreateResponse, SyncResponse

from podbay.bot import Podbay
from podbay.cli import _setup_logging
from podbay.config import Settings
from podbay.transports.matrix import MatrixTransport
from podbay.transports.slack import EVENTS_PATH
from podbay.transports.whatsapp import META_PATH

# The real Synapse of the Matrix tests, imported under the name its conftest uses.
_MATRIX_TESTS = str(Path(__file__).resolve().parents[1] / "matrix")
if _MATRIX_TESTS not in sys.path:
    sys.path.append(_MATRIX_TESTS)
from synapse_server import SynapseServer  # noqa: E402

SLACK_ALICE = "UALICE"
WA_ALICE = "15550001111"
PUBLIC = "https://bot.example.org"
READY_TIMEOUT = 300.0  # the first project builds the base image when it is missing
TURN_TIMEOUT = 180.0  # the first turn also fetches the CLI from npm
REPLY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Secrets:
    """One unique value per secret; only the Slack bot token has a shape redaction knows
    (``xoxb-``), so finding none shows podbay masks what it was configured with."""

    push_token: str = field(default_factory=lambda: "pushtok" + secrets.token_hex(12))
    api_key: str = field(default_factory=lambda: "audit-anthropic-" + secrets.token_hex(12))
    slack_bot_token: str = field(default_factory=lambda: "xoxb-audit-" + secrets.token_hex(12))
    slack_signing_secret: str = field(default_factory=lambda: "sigsec" + secrets.token_hex(12))
    wa_app_secret: str = field(default_factory=lambda: "appsec" + secrets.token_hex(12))
    wa_access_token: str = field(default_factory=lambda: "EAAGaudit" + secrets.token_hex(12))
    wa_verify_token: str = field(default_factory=lambda: "verify" + secrets.token_hex(12))
    matrix_password: str = field(default_factory=lambda: "mxpw" + secrets.token_hex(12))

    def named(self) -> dict[str, str]:
        return dict(vars(self))


# -- an HTTPS git remote that wants the push token -----------------------------------------


@dataclass
class GitRemote:
    url: str
    cert: Path
    authorizations: list[str]
    server: http.server.ThreadingHTTPServer
    thread: threading.Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def https_git_remote(tmp_path: Path, token: str) -> GitRemote:
    """A dumb-protocol git server over HTTPS on 127.0.0.1 that demands ``token`` as the
    basic-auth password (podbay refuses file:// remotes, so a served one is needed).
    Blocking: call it through ``asyncio.to_thread``."""
    seed, served = tmp_path / "seed", tmp_path / "served"
    seed.mkdir()
    served.mkdir()
    (seed / "README.md").write_text("audited\n")
    git = ["git", "-c", "user.name=T", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(seed)], check=True)
    subprocess.run([*git, "-C", str(seed), "add", "."], check=True)
    subprocess.run([*git, "-C", str(seed), "commit", "-qm", "seed"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(served / "r.git")], check=True)
    subprocess.run(["git", "-C", str(served / "r.git"), "update-server-info"], check=True)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self) -> None:
            auth = self.headers.get("Authorization", "")
            seen.append(auth)
            try:
                password = base64.b64decode(auth.removeprefix("Basic ")).decode().split(":", 1)[1]
            except (ValueError, IndexError):
                password = ""
            if not auth.startswith("Basic ") or password != token:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_address[1]}/r.git"
    return GitRemote(url, cert, seen, server, thread)


# -- a person in a Matrix client -----------------------------------------------------------


@dataclass
class MatrixHuman:
    client: AsyncClient
    since: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # every timeline event seen

    async def sync(self, timeout_ms: int = 1000) -> None:
        response = await self.client.sync(
            timeout=timeout_ms, since=self.since, sync_filter={"room": {"timeline": {"limit": 500}}}
        )
        assert isinstance(response, SyncResponse), response
        self.since = response.next_batch
        for room_id, room in response.rooms.join.items():
            self.events.extend({**e.source, "room_id": room_id} for e in room.timeline.events)

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, start: int = 0
    ) -> dict[str, Any]:
        """The first timeline event from ``start`` on that matches (long-polling sync)."""
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                for event in self.events[start:]:
                    if predicate(event):
                        return event
                await self.sync()

    def notices(self) -> list[dict[str, Any]]:
        return [
            e["content"] for e in self.events if e.get("content", {}).get("msgtype") == "m.notice"
        ]

    async def ask(self, room_id: str, text: str, expect: str) -> str:
        await self.sync(0)
        start = len(self.events)
        sent = await self.client.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": text}
        )
        assert hasattr(sent, "event_id"), sent
        notice = await self.wait_for(
            lambda e: (
                e.get("content", {}).get("msgtype") == "m.notice"
                and expect in e["content"].get("body", "")
            ),
            start=start,
        )
        return str(notice["content"]["body"])


# -- the audited podbay --------------------------------------------------------------------


@dataclass
class Audit:
    s: Secrets
    bot: Podbay
    settings: Settings
    slack: FakeSlack
    graph: FakeGraph
    anthropic: claude_api.FakeAnthropic
    alice: MatrixHuman
    bot_id: str
    http: aiohttp.ClientSession
    answers: list[str] = field(default_factory=list)  # what the webhook server answered

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        async with self.http.post(
            self.bot.http.local_url(path), data=io.BytesIO(body), headers=headers
        ) as response:
            return await self._answered(response)

    async def _answered(self, response: aiohttp.ClientResponse) -> int:
        self.answers.append(f"{response.status} {response.headers!r} {await response.text()}")
        return response.status

    # Slack (HTTP mode: signed requests to the webhook server)

    async def slash(self, text: str, *, secret: str | None = None) -> int:
        body = urllib.parse.urlencode(self.slack.slash_command(text, user_id=SLACK_ALICE)).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return await self.post(EVENTS_PATH, body, headers | self.slack.sign(body, secret=secret))

    async def slack_dm(self, text: str) -> int:
        event = {
            "type": "message",
            "user": SLACK_ALICE,
            "text": text,
            "ts": f"1700000{secrets.randbelow(10**6):06d}.{secrets.randbelow(10**6):06d}",
            "channel": "D0001",
            "channel_type": "im",
            "event_ts": "1700000000.000001",
        }
        body = json.dumps(self.slack.event_callback(event)).encode()
        headers = {"Content-Type": "application/json"}
        return await self.post(EVENTS_PATH, body, headers | self.slack.sign(body))

    async def slack_reply(self, fragment: str) -> SlackCall:
        """The first message, ephemeral message or response-URL answer with ``fragment``."""
        methods = ("chat.postMessage", "chat.postEphemeral", "chat.update", "response_url")
        waits = [
            asyncio.create_task(
                self.slack.wait_for(
                    m, lambda c: fragment in json.dumps(c.args), timeout=REPLY_TIMEOUT
                )
            )
            for m in methods
        ]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()[0]
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    # WhatsApp (Meta: signed webhooks)

    async def whatsapp(self, text: str, *, secret: str | None = None) -> int:
        body = json.dumps(self.graph.text_message(text, wa_id=WA_ALICE)).encode()
        headers = {"Content-Type": "application/json"} | self.graph.sign(body, secret=secret)
        return await self.post(META_PATH, body, headers)

    async def meta_verification(self, verify_token: str, challenge: str) -> tuple[int, str]:
        """Meta's subscription handshake: the verify token travels in the query string."""
        query = {"hub.mode": "subscribe", "hub.verify_token": verify_token}
        async with self.http.get(
            self.bot.http.local_url(META_PATH), params=query | {"hub.challenge": challenge}
        ) as response:
            return await self._answered(response), await response.text()

    async def whatsapp_reply(self, fragment: str, timeout: float = REPLY_TIMEOUT) -> str:
        (call, *_) = await self.graph.wait_for(
            lambda c: c.kind == "text" and fragment in c.body["text"]["body"], timeout=timeout
        )
        return str(call.body["text"]["body"])


def audit_settings(
    tmp_path: Path,
    s: Secrets,
    *,
    slack: FakeSlack,
    graph: FakeGraph,
    anthropic: claude_api.FakeAnthropic,
    synapse: SynapseServer,
    bot_id: str,
    alice_id: str,
) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        access={"admins": [f"slack:{SLACK_ALICE}", f"whatsapp:+{WA_ALICE}", f"matrix:{alice_id}"]},
        dispatcher={"coalesce_window_ms": 50, "max_window_ms": 500},
        projects={"root": tmp_path / "projects", "ssh_port_range": (2200, 2299)},
        docker={
            "network": "host",
            "name_prefix": f"pbt{secrets.token_hex(3)}-",
            "ready_timeout_s": 60,
            "reconcile_interval_s": 3600,
            "stats_interval_s": 3600,
            "extra_ca_certs": local_ca_certs(),
        },
        git={"user_name": "Test Dev", "user_email": "dev@example.org"},
        http={"host": "127.0.0.1", "port": 0, "public_url": PUBLIC},
        agent={
            "preset": "claude",
            "base_url": anthropic.base_url,  # ANTHROPIC_BASE_URL of the agent's process
            # The CLI retries 429/5xx ten times with back-off by default: errors at once here.
            "env": {"ANTHROPIC_API_KEY": s.api_key, "CLAUDE_CODE_MAX_RETRIES": "0"},
        },
        transports={
            "matrix": {
                "enabled": True,
                "homeserver": synapse.url,
                "user_id": bot_id,
                "password": s.matrix_password,
            },
            "slack": {
                "enabled": True,
                "mode": "http",
                "bot_token": s.slack_bot_token,
                "signing_secret": s.slack_signing_secret,
                "api_base_url": slack.base_url,
            },
            "whatsapp": {
                "enabled": True,
                "provider": "meta",
                "verify_token": s.wa_verify_token,
                "app_secret": s.wa_app_secret,
                "access_token": s.wa_access_token,
                "phone_number_id": graph.phone_number_id,
                "graph_api_base": graph.base_url,
                "graph_api_version": graph.version,
            },
        },
    )


@contextlib.contextmanager
def real_run_logging(settings: Settings) -> Iterator[None]:
    """The handlers `podbay run -vv` installs (stderr and <data dir>/podbay.log), removed
    afterwards; the podbay logger stays at DEBUG so caplog sees everything."""
    root, own = logging.getLogger(), logging.getLogger("podbay")
    before, levels = list(root.handlers), (root.level, own.level)
    _setup_logging(2, settings.data_dir, settings.log)
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(levels[0])
        own.setLevel(levels[1])


async def matrix_human(synapse: SynapseServer, localpart: str) -> MatrixHuman:
    password = "human-" + secrets.token_hex(8)
    user_id = await synapse.register(localpart, password)
    client = AsyncClient(synapse.url, user_id)
    await client.login(password)
    person = MatrixHuman(client)
    await person.sync(0)
    return person


@contextlib.asynccontextmanager
async def audited_podbay(tmp_path: Path, s: Secrets) -> AsyncIterator[Audit]:
    async with contextlib.AsyncExitStack() as stack:
        synapse = SynapseServer(tmp_path / "synapse")
        await synapse.start()
        stack.push_async_callback(synapse.stop)
        anthropic = await stack.enter_async_context(claude_api.FakeAnthropic(api_key=s.api_key))
        slack = await stack.enter_async_context(
            FakeSlack(bot_token=s.slack_bot_token, signing_secret=s.slack_signing_secret)
        )
        graph = await stack.enter_async_context(
            FakeGraph(
                access_token=s.wa_access_token,
                app_secret=s.wa_app_secret,
                verify_token=s.wa_verify_token,
            )
        )
        tag = secrets.token_hex(3)
        bot_id = await synapse.register(f"podbay{tag}", s.matrix_password)
        alice = await matrix_human(synapse, f"alice{tag}")
        stack.push_async_callback(alice.client.close)
        settings = audit_settings(
            tmp_path,
            s,
            slack=slack,
            graph=graph,
            anthropic=anthropic,
            synapse=synapse,
            bot_id=bot_id,
            alice_id=alice.client.user_id,
        )
        (tmp_path / "projects").mkdir()
        stack.enter_context(real_run_logging(settings))
        bot = Podbay(settings, shutdown_grace_s=1)  # the transports come from the plugins
        assert sorted(t.name for t in bot.transports) == ["matrix", "slack", "whatsapp"]
        await bot.start()
        assert bot.engine is not None and bot.engine.projects is not None
        instance = bot.engine.projects.instance
        stack.push_async_callback(asyncio.to_thread, remove_instance_containers, instance, settings)
        stack.push_async_callback(bot.stop)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        (matrix,) = (t for t in bot.transports if isinstance(t, MatrixTransport))
        await asyncio.wait_for(matrix.ready.wait(), REPLY_TIMEOUT)
        yield Audit(s, bot, settings, slack, graph, anthropic, alice, bot_id, http)


# -- where secrets could end up ------------------------------------------------------------


def raw_log_text(records: list[logging.LogRecord]) -> str:
    """Every record as logged, before any formatter: message, arguments, traceback."""
    lines = []
    for record in records:
        lines.append(f"{record.name} {record.getMessage()} {record.args!r}")
        if record.exc_info and record.exc_info[1] is not None:
            lines.append("".join(traceback.format_exception(*record.exc_info)))
    return "\n".join(lines)


def table_dump(db_path: Path) -> dict[str, str]:
    """Every row of every table, as text, by table."""
    db = sqlite3.connect(db_path)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            name: "\n".join(repr(row) for row in db.execute(f'SELECT * FROM "{name}"'))
            for name in names
        }
    finally:
        db.close()


def inspect_json(container: str) -> str:
    from docker.client import DockerClient

    client = DockerClient.from_env(timeout=60)
    try:
        return json.dumps(client.api.inspect_container(container))
    finally:
        client.close()


def found(value: str, places: dict[str, str]) -> list[str]:
    return [where for where, text in places.items() if value in text]


# -- the scenario --------------------------------------------------------------------------


async def test_no_secret_is_in_any_log_row_reply_or_docker_inspect(
    docker_engine: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    s = Secrets()
    places: dict[str, str] = {}
    remote = await asyncio.to_thread(https_git_remote, tmp_path, s.push_token)
    try:
        monkeypatch.setenv("GIT_SSL_CAINFO", str(remote.cert))  # the clone trusts the remote
        async with audited_podbay(tmp_path, s) as a:
            # WhatsApp, a private chat: the project, from a remote that wants the token.
            assert await a.whatsapp("whoami") == 200
            await a.whatsapp_reply(f"whatsapp:+{WA_ALICE}")
            new = f"new project demo --git {remote.url} --token {s.push_token}"
            assert await a.whatsapp(new) == 200
            ready = await a.whatsapp_reply("is ready", timeout=READY_TIMEOUT)
            assert "Push token stored" in ready
            # Meta's handshake (the verify token is in the URL) and, as error paths, a wrong
            # verify token, a forged webhook, a typo and a refused remote given with a token.
            assert await a.meta_verification(s.wa_verify_token, "c1234") == (200, "c1234")
            assert (await a.meta_verification("not-the-verify-token", "c5678"))[0] == 403
            assert await a.whatsapp("status", secret="not-the-app-secret") == 401
            assert await a.whatsapp("statsu") == 200
            await a.whatsapp_reply("Unknown command")
            bad = f"new project other --git file://{tmp_path}/served/r.git --token {s.push_token}"
            assert await a.whatsapp(bad) == 200
            await a.whatsapp_reply("Unsupported git URL")

            # A claude turn in the container: the model runs echo, then repeats its key.
            assert await a.whatsapp("verbose 2") == 200
            await a.whatsapp_reply("Verbosity here is now 2")
            a.anthropic.script(
                claude_api.bash("echo audit-$((6*7)); printenv ANTHROPIC_API_KEY"),
                claude_api.Text(f"Echoed it. My key is {s.api_key} by the way."),
            )
            assert await a.whatsapp("please echo something") == 200
            answer = await a.whatsapp_reply("Echoed it.", timeout=TURN_TIMEOUT)
            await a.whatsapp_reply("turn", timeout=REPLY_TIMEOUT)  # the footer: run recorded
            assert "[redacted]" in answer, answer
            tool_results = json.dumps(a.anthropic.turn_requests[-1].body["messages"])
            assert "audit-42" in tool_results, "the echo ran in the container"
            assert await a.whatsapp("run 1") == 200
            await a.whatsapp_reply("#1")

            # Slack: signed slash commands, a DM, a forged request, a typo, a token in a
            # channel (not private: refused).
            assert await a.slash("status") == 200
            await a.slack_reply("demo")
            assert await a.slack_dm("whoami") == 200
            await a.slack_reply(f"slack:{SLACK_ALICE}")
            assert await a.slash("status", secret="not-the-signing-secret") == 401
            assert await a.slash("statsu") == 200
            await a.slack_reply("Unknown command")
            assert await a.slash(f"new project chan --token {s.push_token}") == 200
            await a.slack_reply("private 1:1")

            # Matrix (podbay logged in with the password): a DM from a human, a command, a
            # typo.
            created = await a.alice.client.room_create(invite=[a.bot_id], is_direct=True)
            assert isinstance(created, RoomCreateResponse), created
            await a.alice.wait_for(
                lambda e: (
                    e.get("type") == "m.room.member"
                    and e.get("state_key") == a.bot_id
                    and e.get("content", {}).get("membership") == "join"
                )
            )
            await a.alice.ask(created.room_id, "status demo", "demo")
            await a.alice.ask(created.room_id, "statsu", "Unknown command")

            # Each secret was really used (so finding none means something).
            assert {r.headers.get("x-api-key") for r in a.anthropic.turn_requests} == {s.api_key}
            expected = "Basic " + base64.b64encode(f"oauth2:{s.push_token}".encode()).decode()
            assert expected in remote.authorizations, "the clone authenticated with the token"
            assert {c.token for c in a.slack.calls_to("chat.postMessage")} == {s.slack_bot_token}
            assert {c.token for c in a.graph.calls} == {s.wa_access_token}

            places["docker inspect"] = await asyncio.to_thread(
                inspect_json,
                a.bot.engine.projects.container_name("demo"),  # type: ignore[union-attr]
            )
            places["slack calls"] = json.dumps(
                [(c.method, c.args, c.response) for c in a.slack.calls]
            )
            places["graph calls"] = json.dumps(
                [(c.path, c.body, c.response) for c in a.graph.calls]
            )
            places["matrix events"] = json.dumps(a.alice.events)
            places["webhook answers"] = "\n".join(a.answers)
            db_path = a.settings.data_dir / "podbay.db"
            log_path = a.settings.data_dir / "podbay.log"
            await a.bot.stop()  # flushes the logs and closes the database
    finally:
        await asyncio.to_thread(remote.close)
    tables = await asyncio.to_thread(table_dump, db_path)
    places.update({f"table {name}": rows for name, rows in tables.items()})
    places["log records (raw, DEBUG)"] = await asyncio.to_thread(raw_log_text, caplog.records)
    places["stderr of -vv"] = capsys.readouterr().err
    places["podbay.log"] = await asyncio.to_thread(log_path.read_text)
    assert places["stderr of -vv"] and places["podbay.log"], "a real run logs to both"

    leaks = {name: where for name, value in s.named().items() if (where := found(value, places))}
    assert not leaks, f"secrets found (secret: places): {leaks}"
