"""The coalescing per-session dispatcher: it owns ordering and concurrency.

Every inbound message is written to the inbox first (a redelivery is dropped there).
Each session then handles its messages in arrival order on a *front lane*: control
commands are answered at once, job commands are validated (and confirmed) in order and
then run in the background as engine jobs, and freeform text goes to the session's
*freeform lane*. The freeform lane debounces messages into batches, runs at most one
agent run at a time, and queues whatever arrives during a run for one follow-up run.
A FIFO of slots caps concurrent runs across all sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from podbay.commands.confirm import Proposals
from podbay.commands.context import CommandContext
from podbay.commands.registry import Freeform, Invocation, Registry
from podbay.commands.roles import Role, role_for
from podbay.config import Settings
from podbay.engine.agents import AgentEvent, FinishedEvent, NoticeEvent, TextEvent, ToolEvent
from podbay.engine.core import Engine
from podbay.engine.runs import RunPlan
from podbay.engine.store import InboxRow, InboxStatus, ProjectRow, SessionRow
from podbay.errors import PermissionDenied, StorageFull, UserError
from podbay.messages import Inbound, MessageRef, Reply, Sender, SessionKey
from podbay.ratelimit import RateLimiter
from podbay.redact import REDACTED
from podbay.transports.base import (
    DeliveryRefused,
    Health,
    Supervised,
    Transport,
    TransportState,
)
from podbay.transports.render import code_block

log = logging.getLogger(__name__)


class Survivor(Protocol):
    """A process of the previous run that podbay found still running and killed."""

    @property
    def pid(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def project(self) -> str: ...
    @property
    def session_key(self) -> str: ...


@dataclass(frozen=True)
class Pending:
    inbox_id: int
    sender: Sender
    text: str


@dataclass
class ActiveRun:
    run_id: int
    messages: int
    started: float
    project: str = ""
    # A reply of this run was refused by the platform (recorded once on the run).
    undelivered: bool = False


@dataclass
class _Session:
    key: SessionKey
    # (inbox id, message, whether it carries a secret: None when not yet looked at)
    front: deque[tuple[int, Inbound, bool | None]] = field(default_factory=deque)
    front_task: asyncio.Task[None] | None = None
    pending: list[Pending] = field(default_factory=list)
    first_at: float | None = None
    deadline: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    lane_task: asyncio.Task[None] | None = None
    # The current agent run of the lane. `stop` cancels this, never the lane: a lane stays
    # alive while its conversation has pending messages.
    run_task: asyncio.Task[None] | None = None
    running: ActiveRun | None = None
    typing: bool = False
    scratch: Path | None = None  # the conversation's host workdir, once worked out

    @property
    def idle(self) -> bool:
        return (
            not self.front
            and self.front_task is None
            and self.lane_task is None
            and not self.pending
        )


class FifoSlots:
    """A semaphore that hands out slots strictly in request order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def in_use(self) -> int:
        return self.size - self._free

    def try_acquire(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future in self._waiters:
                self._waiters.remove(future)
            elif future.done() and not future.cancelled():
                self.release()  # handed a slot just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        self._free += 1


class _Slot:
    """One run's hold on a slot: given back once, by whichever gets there first (the run as
    soon as its agent is done, before its bookkeeping is committed, or its lane)."""

    __slots__ = ("_slots",)

    def __init__(self, slots: FifoSlots) -> None:
        self._slots: FifoSlots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            slots, self._slots = self._slots, None
            slots.release()


def compose_prompt(batch: list[Pending]) -> str:
    """Join a batch by blank lines; name each sender when more than one wrote."""
    several = len({p.sender.identity for p in batch}) > 1
    return "\n\n".join(f"{p.sender.name}: {p.text}" if several else p.text for p in batch)


class Dispatcher:
    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.registry = registry
        self.settings = settings
        self._cfg = settings.dispatcher
        self._clock = clock
        self.proposals = Proposals(self._cfg.confirm_timeout_s, clock)
        self._transports: dict[str, Transport] = {}
        self._sessions: dict[SessionKey, _Session] = {}
        self._slots = FifoSlots(self._cfg.max_concurrent_runs)
        self._idle = asyncio.Event()
        self._idle.set()
        self._flushing = False
        self._closed = False
        # Until recover() has run, arriving messages are only recorded in the inbox and
        # held: nothing is handled before the previous run's leftovers are dealt with.
        self._accepting = False
        self._cancelling = False  # shutdown is cancelling what is left: no new lanes
        self._held: list[tuple[int, Inbound]] = []
        self._replayed: set[int] = set()
        # What the engine's run service cannot say through an event (a stop that left
        # processes behind) reaches the conversation through this.
        engine.runs.notify = self._notify
        # Counters a user (or `status`) can see; never reset while running.
        self.stats = {"runs": 0, "refused": 0, "redeliveries": 0, "denied": 0, "rate_limited": 0}
        self._rate = RateLimiter(self._cfg.rate_limit_per_minute, clock)
        self._scratch = settings.data_dir.resolve() / "scratch"  # host agents' workdirs

    # -- wiring -----------------------------------------------------------------------

    def attach(self, transport: Transport) -> None:
        self._transports[transport.name] = transport

    def transport_states(self) -> list[TransportState]:
        """How each attached transport says it is doing (for `status`)."""
        return [t.health.state for t in self._transports.values() if isinstance(t, Supervised)]

    @property
    def live_sessions(self) -> int:
        return len(self._sessions)

    @property
    def active_runs(self) -> int:
        return self._slots.in_use

    async def send(self, session: SessionKey, reply: Reply) -> MessageRef | None:
        """Send through the session's transport; a failing platform never breaks a lane."""
        transport = self._transports.get(session.transport)
        if transport is None:
            log.warning("no transport %r for a reply to %s", session.transport, session)
            return None
        try:
            return await transport.send(session, reply)
        except DeliveryRefused as exc:
            log.warning("a reply to %s was refused: %s", session, exc)
            await self._record_refusal(session, str(exc))
            return None
        except Exception:
            log.exception("sending a reply to %s failed", session)
            return None

    async def _record_refusal(self, session: SessionKey, reason: str) -> None:
        """Note on the session's run (once per run) that its replies did not arrive."""
        state = self._sessions.get(session)
        running = state.running if state is not None else None
        if running is None or running.undelivered:
            return
        running.undelivered = True
        try:
            await self.store.run_event(running.run_id, "undelivered", self.registry.redact(reason))
        except Exception:
            log.exception("recording an undelivered reply on run %s failed", running.run_id)

    async def _notify(self, session: SessionKey, text: str) -> None:
        await self.send(session, Reply(text, "error"))

    def _can_edit(self, session: SessionKey) -> bool:
        transport = self._transports.get(session.transport)
        return transport is not None and transport.capabilities.edits

    async def edit(self, ref: MessageRef, reply: Reply) -> MessageRef | None:
        transport = self._transports.get(ref.session.transport)
        if transport is None:
            return None
        try:
            return await transport.edit(ref, reply)
        except Exception:
            log.exception("editing a message in %s failed", ref.session)
            return None

    def _typing_due(self, state: _Session, active: bool) -> Transport | None:
        """The transport, when the conversation's typing indicator is to be switched."""
        transport = self._transports.get(state.key.transport)
        if transport is None or not transport.capabilities.typing or state.typing == active:
            return None
        return transport

    async def _typing(self, state: _Session, active: bool) -> None:
        transport = self._typing_due(state, active)
        if transport is None:
            return
        state.typing = active
        try:
            await transport.typing(state.key, active)
        except Exception:
            log.warning("typing indicator for %s failed", state.key, exc_info=True)

    # -- intake -----------------------------------------------------------------------

    async def submit(self, inbound: Inbound) -> None:
        """Entry point for transports. Returns once the message is safely in the inbox.

        Never raises for a bad message: one that cannot be stored gets an error reply of
        its own, so a transport's receive loop never dies on it.
        """
        try:
            size = len(inbound.text.encode("utf-8"))
        except UnicodeEncodeError:
            await self._refuse(
                inbound,
                inbound.text.encode("utf-8", "replace").decode("utf-8"),
                "unreadable text",
                "I could not read that message: it is not valid text (UTF-8). Nothing was "
                "done; send it again.",
            )
            return
        limit = self._cfg.max_message_bytes
        if size > limit:
            await self._refuse(
                inbound,
                # Redacted before it is cut: a cut can leave a secret unrecognisable.
                _excerpt(self.registry.redact(inbound.text[:4096]), 200),
                f"too long: {size} bytes",
                f"That message is too long ({_kib(size)}; the limit is {_kib(limit)}, "
                "`dispatcher.max_message_bytes`). Nothing was done: send it in parts, or "
                "put the text in a file in the project and refer to it.",
            )
            return
        stored = self.registry.redact(inbound.text)
        carries_secret = stored != inbound.text
        # Most of a burst are prompts: one known as such before it is stored is stored as
        # taken (its lane takes it the moment it is stored, unless busy: see _enqueue).
        prompt = (
            self._as_prompt(inbound)
            if self._accepting and not self._closed and not carries_secret
            else None
        )
        try:
            if prompt is None:
                inbox_id = await self.store.inbox_add(inbound, stored)
            else:
                inbox_id = await self.store.inbox_add(
                    inbound, stored, status="processing", kind="freeform"
                )
        except Exception as exc:
            ref = secrets.token_hex(4)
            quoted = _excerpt(self.registry.redact(inbound.text), 60)
            if isinstance(exc, StorageFull):
                log.error(
                    "storing a message from %s failed: %s [ref %s]", inbound.session, exc, ref
                )
                text = f"{exc} Nothing of “{quoted}” was done: free space, then send it again."
            else:
                log.exception("storing a message from %s failed [ref %s]", inbound.session, ref)
                text = f"I could not store “{quoted}” (ref `{ref}`); send it again."
            await self.send(inbound.session, Reply(text, "error"))
            return
        if inbox_id is None:
            self.stats["redeliveries"] += 1
            log.debug("redelivery of %s/%s dropped", inbound.session.transport, inbound.platform_id)
            return
        if not await self._within_rate(inbox_id, inbound):
            return
        if self._closed:
            # Stays (or is again) "received": the next start dispatches it.
            if prompt is not None:
                self.store.inbox_mark_later([inbox_id], "received", kind="")
            return
        if not self._accepting:
            self._held.append((inbox_id, inbound))
            return
        if inbox_id in self._replayed:
            return  # stored before recovery read the inbox: recovery dispatched it
        self._enqueue(inbox_id, inbound, carries_secret=carries_secret, prompt=prompt)

    async def _within_rate(self, inbox_id: int, inbound: Inbound) -> bool:
        """Count the message against its sender's limit; over it, it is recorded and
        dropped, and the sender is told once (the local console has no limit)."""
        transport = self._transports.get(inbound.session.transport)
        health = getattr(transport, "health", None)  # not isinstance(Protocol): per message
        if isinstance(health, Health) and health.state.local:
            return True
        identity = inbound.sender.identity
        verdict = self._rate.check(identity)
        if verdict == "ok":
            return True
        self.stats["rate_limited"] += 1
        try:
            await self.store.inbox_mark([inbox_id], "done", kind="rate-limited")
        except Exception:
            log.exception("recording a rate-limited message from %s failed", identity)
        if verdict == "tripped" and role_for(identity, self.settings.access) is not None:
            limit = self._rate.per_minute
            wait = max(1, round(self._rate.retry_in(identity)))
            await self.send(
                inbound.session,
                Reply(
                    f"You are sending messages faster than podbay accepts ({limit} a minute, "
                    f"`dispatcher.rate_limit_per_minute`). Nothing you send in the next "
                    f"{wait} s is done; send it again after that.",
                    "error",
                    private_to=inbound.sender,
                ),
            )
        return False

    async def _refuse(self, inbound: Inbound, stored: str, note: str, reply: str) -> None:
        """Record a message that cannot be handled (redeliveries stay dropped), and say why."""
        try:
            inbox_id = await self.store.inbox_add(
                replace(inbound, text=stored), self.registry.redact(stored)
            )
            if inbox_id is None:
                return  # a redelivery of a message already refused
            await self.store.inbox_mark([inbox_id], "done", kind="refused", note=note)
        except Exception:
            log.exception("recording a refused message from %s failed", inbound.session)
        await self.send(inbound.session, Reply(reply, "error"))

    def _state(self, key: SessionKey) -> _Session:
        state = self._sessions.get(key)
        if state is None:
            state = self._sessions[key] = _Session(key)
            self._idle.clear()
        return state

    def _enqueue(
        self,
        inbox_id: int,
        inbound: Inbound,
        *,
        carries_secret: bool | None = None,
        prompt: str | None = None,
    ) -> None:
        """Hand a stored message to its conversation. ``prompt``: the message is a prompt
        (see :meth:`_as_prompt`), stored as taken; with the front lane idle and room in
        the queue it joins the next run at once, without a task of its own."""
        state = self._state(inbound.session)
        if (
            prompt is not None
            and state.front_task is None
            and not state.front
            and len(state.pending) < self._cfg.max_queued_messages
            and self._typing_due(state, True) is None
        ):
            self._queue_prompt(state, inbox_id, inbound, prompt, marked=True)
            return
        state.front.append((inbox_id, inbound, carries_secret))
        if state.front_task is None:
            state.front_task = asyncio.create_task(
                self._front(state), name=f"front-{inbound.session}"
            )

    def _maybe_evict(self, state: _Session) -> None:
        if state.idle and self._sessions.get(state.key) is state:
            del self._sessions[state.key]
            if not self._sessions:
                self._idle.set()

    async def _front(self, state: _Session) -> None:
        try:
            while state.front:
                inbox_id, inbound, carries_secret = state.front.popleft()
                try:
                    await self._handle(state, inbox_id, inbound, carries_secret)
                except Exception:
                    # _handle reports its own errors; this is the last line of defence.
                    log.exception("front lane of %s failed on inbox %s", state.key, inbox_id)
        finally:
            state.front_task = None
            state.wake.set()  # a flushing lane waits for every message to reach it
            self._maybe_evict(state)

    def _as_prompt(self, inbound: Inbound) -> str | None:
        """The prompt, when ``inbound`` (no secret in it) is one from an operator that a
        lane takes as it is; None for anything else (a command, a refusal, a click, a
        project name not yet known): the front lane's :meth:`_handle` deals with that."""
        if inbound.action is not None:
            return None
        role = role_for(inbound.sender.identity, self.settings.access)
        names = self.store.cached_project_names()
        if role is None or role < Role.OPERATOR or names is None:
            return None
        try:
            parsed = self.registry.parse(
                inbound.text,
                mentioned=inbound.mentioned,
                extra_aliases=inbound.aliases,
                projects=names,
            )
        except Exception:
            return None  # a mistyped command: _handle parses it again and says so
        if not isinstance(parsed, Freeform) or not (parsed.addressed or inbound.ambient):
            return None
        return parsed.text

    async def _handle(
        self, state: _Session, inbox_id: int, inbound: Inbound, carries_secret: bool | None
    ) -> None:
        identity = inbound.sender.identity
        role = role_for(identity, self.settings.access)
        if role is None:
            await self.store.inbox_mark([inbox_id], "done", kind="denied")
            await self.store.audit(
                identity, "message", "denied: unknown sender", session=inbound.session
            )
            await self._deny(inbound)
            return
        kind = ""
        invocation: Invocation | None = None
        outcome, note = "ok", ""
        status: InboxStatus = "done"
        try:
            if inbound.action is not None:
                # A click: a typed decision, never parsed as text (nor fed to the agent).
                invocation = self.registry.for_action(inbound.action)
                kind = invocation.spec.kind
                await self.store.inbox_mark([inbox_id], "processing", kind=kind)
                await self._command(inbound, role, invocation)
            else:
                if carries_secret is None:
                    carries_secret = self.registry.has_secret(inbound.text)
                if carries_secret:
                    await self._redact_secret(inbound)
                if carries_secret and not inbound.is_direct:
                    kind = "control"
                    raise UserError(
                        "Secrets such as `--token` are accepted only in a private 1:1 conversation "
                        "with podbay. Nothing was done; revoke that token if others can read this "
                        "room, and send the command again in a direct message."
                    )
                parsed = self.registry.parse(
                    inbound.text,
                    mentioned=inbound.mentioned,
                    extra_aliases=inbound.aliases,
                    # "delete demo2 now" names a project: a mistyped command, never a prompt.
                    projects=await self.store.project_names(),
                )
                if isinstance(parsed, Freeform):
                    kind = "freeform"
                    if not parsed.addressed and not inbound.ambient:
                        # Chatter in a group room that did not address the bot.
                        await self.store.inbox_mark([inbox_id], "done", kind="ignored")
                        return
                    if role < Role.OPERATOR:
                        raise PermissionDenied(
                            "Talking to the agent needs the operator role; "
                            f"you are {role.with_article}."
                        )
                    # A secret never reaches the agent (nor runs.prompt, nor its echo). The
                    # text is the message less a leading address, so a message without a
                    # secret leaves nothing to redact in it.
                    prompt = self.registry.redact(parsed.text) if carries_secret else parsed.text
                    await self._accept_freeform(state, inbox_id, inbound, prompt)
                    return
                invocation = parsed
                kind = parsed.spec.kind
                await self.store.inbox_mark([inbox_id], "processing", kind=kind)
                await self._command(inbound, role, parsed)
        except UserError as exc:
            # Errors may quote what the user typed (a project name, a topic): never a secret
            # of it. (Redacting the error text itself would mangle "--token needs a value".)
            text = _without(str(exc), self.registry.secret_values(inbound.text))
            outcome = f"refused: {text}"
            # Meant for whoever sent it: shown to them alone where the platform can.
            await self.send(inbound.session, Reply(text, "error", private_to=inbound.sender))
        except Exception as exc:
            ref = secrets.token_hex(4)
            note = self.registry.redact(f"ref {ref}: {exc}")
            outcome, status = f"error (ref {ref})", "failed"
            log.exception("handling inbox %s failed [ref %s]", inbox_id, ref)
            await self.send(inbound.session, Reply(f"Something went wrong (ref `{ref}`).", "error"))
        await self.store.inbox_mark([inbox_id], status, kind=kind, note=note)
        if invocation is not None:
            await self.store.audit(
                identity,
                invocation.spec.name,
                outcome[:300],
                session=inbound.session,
                target=self.registry.redact(next(iter(invocation.args.values()), ""))[:200],
                detail=self.registry.redact(inbound.text)[:500],
            )
        elif outcome != "ok":
            # Refused without a command (freeform from a viewer, a secret in a group room):
            # on record like every refusal.
            await self.store.audit(
                identity,
                kind or "message",
                outcome[:300],
                session=inbound.session,
                detail=self.registry.redact(inbound.text)[:500],
            )

    async def _command(self, inbound: Inbound, role: Role, invocation: Invocation) -> None:
        spec = invocation.spec
        if role < spec.role:
            raise PermissionDenied(
                f"`{spec.name}` needs the {spec.role.label} role; you are {role.with_article}."
            )
        transport = self._transports.get(inbound.session.transport)
        ctx = CommandContext(
            inbound=inbound,
            role=role,
            engine=self.engine,
            registry=self.registry,
            settings=self.settings,
            proposals=self.proposals,
            control=self,
            send=self.send,
            edit=self.edit if self._can_edit(inbound.session) else None,
            required_role=spec.role,
            buttons=transport is not None and transport.capabilities.buttons,
        )
        await spec.handler(ctx, invocation)

    async def _redact_secret(self, inbound: Inbound) -> None:
        """Remove a message carrying a secret from the chat history, where podbay can."""
        transport = self._transports.get(inbound.session.transport)
        if transport is None or not transport.capabilities.redaction:
            return
        try:
            done = await transport.redact(
                inbound.session, inbound.platform_id, "contained a secret"
            )
        except Exception:
            log.warning("redacting a secret in %s failed", inbound.session, exc_info=True)
            done = False
        note = (
            "I redacted your message because it contained a secret."
            if done
            else "Your message contains a secret and I could not redact it: delete it yourself."
        )
        await self.send(inbound.session, Reply(note, "info"))

    async def _deny(self, inbound: Inbound) -> None:
        self.stats["denied"] += 1
        identity = inbound.sender.identity
        interval = self.settings.access.deny_reply_interval_s
        # In the store, not in memory: a restart must not repeat the refusal.
        if not await self.store.denial_due(identity, interval):
            return
        await self.send(
            inbound.session,
            Reply(
                f"You are not allowed to use podbay here; ask an admin to add `{identity}` "
                "to [access] in podbay's config.",
                "denied",
            ),
        )

    # -- freeform lane ----------------------------------------------------------------

    async def _accept_freeform(
        self, state: _Session, inbox_id: int, inbound: Inbound, text: str
    ) -> None:
        limit = self._cfg.max_queued_messages
        if len(state.pending) >= limit:
            self.stats["refused"] += 1
            await self.store.inbox_mark([inbox_id], "done", kind="freeform", note="refused: full")
            await self.send(
                state.key,
                Reply(
                    f"Not queued: {len(state.pending)} messages are already waiting (the limit "
                    f"is {limit}). Wait for the current run to finish, or send `stop`.",
                    "error",
                ),
            )
            return
        self._queue_prompt(state, inbox_id, inbound, text, marked=False)
        await self._typing(state, True)

    def _queue_prompt(
        self, state: _Session, inbox_id: int, inbound: Inbound, text: str, *, marked: bool
    ) -> None:
        """Queue an accepted prompt for the conversation's next run (``marked``: its inbox
        row says so already)."""
        if not marked:
            # Not waited for: the run that takes this message is recorded after it (writes
            # are committed in order), and until then a restart redoes the message.
            self.store.inbox_mark_later([inbox_id], "processing", kind="freeform")
        now = self._clock()
        state.pending.append(Pending(inbox_id, inbound.sender, text))
        if state.first_at is None:
            state.first_at = now
        window = self._cfg.coalesce_window_ms / 1000
        ceiling = state.first_at + self._cfg.max_window_ms / 1000
        state.deadline = now if self._flushing else min(now + window, ceiling)
        state.wake.set()
        self._ensure_lane(state)

    def _ensure_lane(self, state: _Session) -> None:
        if state.lane_task is None and state.pending and not self._cancelling:
            state.lane_task = asyncio.create_task(self._lane(state), name=f"lane-{state.key}")

    async def _wait_deadline(self, state: _Session) -> None:
        while True:
            timeout: float | None
            if self._flushing:
                # Flushing (end of input, shutdown): fire as soon as every message already
                # submitted to this session has reached the lane, so a burst stays whole.
                if not state.front and state.front_task is None:
                    return
                timeout = None
            else:
                timeout = state.deadline - self._clock()
                if timeout <= 0:
                    return
            state.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.wake.wait(), timeout)

    async def _lane(self, state: _Session) -> None:
        try:
            while state.pending:
                await self._wait_deadline(state)
                if not self._slots.try_acquire():
                    ahead, size = self._slots.waiting, self._slots.size
                    await self.send(
                        state.key,
                        Reply(
                            f"Queued ({ahead} ahead): all {size} agent slot(s) are busy; "
                            "your run starts when one frees up.",
                            "progress",
                        ),
                    )
                    await self._slots.acquire()
                slot = _Slot(self._slots)
                try:
                    # Whatever arrived while we waited for a slot joins this batch.
                    batch, state.pending, state.first_at = state.pending, [], None
                    if batch:
                        await self._run_batch(state, batch, slot)
                finally:
                    slot.release()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            ref = secrets.token_hex(4)
            log.exception("freeform lane of %s failed [ref %s]", state.key, ref)
            # Never silent: the conversation learns its run went wrong (a full disk says so).
            said = str(exc) if isinstance(exc, UserError) else f"internal error, ref `{ref}`"
            await self.send(
                state.key,
                Reply(f"The agent run here broke off ({said}); send your message again.", "error"),
            )
        finally:
            # Cleared before any await: a message accepted from now on starts a new lane.
            state.lane_task = None
            if not state.pending:
                await self._typing(state, False)
            self._ensure_lane(state)
            self._maybe_evict(state)

    async def _run_batch(self, state: _Session, batch: list[Pending], slot: _Slot) -> None:
        """Record a run for ``batch`` and execute it as a task that `stop` may cancel."""
        ids = [p.inbox_id for p in batch]
        prompt = compose_prompt(batch)
        session_row = await self.store.session_get(state.key)
        project = (
            await self.store.project_get(session_row.active_project)
            if session_row.active_project
            else None
        )
        name = project.name if project else ""
        # Recorded without waiting: the run's last write (its messages done) is waited
        # for, and is committed after this one.
        run_id = await self.store.run_create(
            state.key, name, prompt, self.engine.agent_name, inbox_ids=ids, wait=False
        )
        self.stats["runs"] += 1
        state.running = ActiveRun(run_id, len(batch), self._clock(), name)
        task = state.run_task = asyncio.create_task(
            self._run(state, run_id, ids, prompt, session_row, project, slot),
            name=f"run-{run_id}",
        )
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            state.run_task = None
            state.running = None
            if task.done() and (task.cancelled() or task.exception() is not None):
                # However early it was cut short, the run is never left "pending".
                await asyncio.shield(self._cancelled(run_id, ids))
        if not task.cancelled() and (error := task.exception()) is not None:
            # Not the agent failing (that is a FinishedEvent) but podbay: the lane tells
            # the conversation (a full disk says so), whether or not the clean-up failed too.
            raise error

    async def _cancelled(self, run_id: int, ids: list[int]) -> None:
        if await self.store.run_finish_if_active(run_id, "cancelled", error="stopped"):
            await self.store.inbox_mark(ids, "done", note="run cancelled")

    def _workdir(self, state: _Session, project: ProjectRow | None) -> Path:
        """The project's source, or a per-conversation scratch directory: a host agent must
        never run in podbay's own working directory."""
        if project is not None:
            return Path(project.path)
        if state.scratch is None:
            digest = hashlib.sha256(str(state.key).encode()).hexdigest()[:16]
            state.scratch = self._scratch / digest
        return state.scratch

    async def _run(
        self,
        state: _Session,
        run_id: int,
        ids: list[int],
        prompt: str,
        session_row: SessionRow,
        project: ProjectRow | None,
        slot: _Slot,
    ) -> None:
        # The slot caps agents at work: it is given back as soon as the agent is done (or
        # stopped), before the run's bookkeeping is committed, so the next conversation's
        # run need not wait for that commit.
        try:
            # A scratch directory is made by the agent that runs in it (on the host).
            workdir = self._workdir(state, project)
            plan = RunPlan(run_id, state.key, prompt, project, session_row, workdir)
            relay = Relay(self, state.key, verbose=session_row.verbose, clock=self._clock)
            async for event in self.engine.runs.execute(plan):
                await relay.event(event)
        except asyncio.CancelledError:
            slot.release()
            await self._cancelled(run_id, ids)
            raise
        except UserError as exc:
            slot.release()
            await self.store.inbox_mark(ids, "done", run=run_id)
            await self.send(state.key, Reply(str(exc), "error"))
            return
        slot.release()
        await self.store.inbox_mark(ids, "done", run=run_id)

    # -- control ----------------------------------------------------------------------

    async def stop_session(self, session: SessionKey) -> str:
        """Cancel the session's run (awaiting it) and drop its queue."""
        state = self._sessions.get(session)
        if state is None or (not state.pending and state.run_task is None):
            return "Nothing to stop."
        dropped, state.pending, state.first_at = state.pending, [], None
        if dropped:
            await self.store.inbox_mark(
                [p.inbox_id for p in dropped], "done", note="dropped by stop"
            )
        # Cancel the run, not the lane: messages arriving from now on still get a lane.
        task = state.run_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return f"Stopped. Dropped {len(dropped)} queued message(s)."

    async def cancel_project_runs(self, project: str) -> int:
        """Stop every conversation's run on ``project`` (before it is deleted)."""
        keys = [k for k, s in self._sessions.items() if s.running and s.running.project == project]
        # Each stop awaits its run's end; a cancellation must not wait for another's.
        for key in keys:
            await self.send(key, Reply(await self.stop_session(key), "progress"))
        return len(keys)

    # -- lifecycle --------------------------------------------------------------------

    async def recover(self, survivors: Sequence[Survivor] = ()) -> None:
        """After a crash: record interrupted work, tell its sessions, then start dispatching
        (the held messages and those the inbox still has as received)."""
        await self.store.runs_interrupt_stale()
        for job in await self.store.jobs_interrupt_stale():
            key = SessionKey.parse(job.session_key) if job.session_key else None
            if key is not None:
                await self.send(
                    key,
                    Reply(
                        f"podbay restarted during `{job.kind}` of {job.project}; "
                        "check `status` and retry if needed.",
                        "error",
                    ),
                )
        stopped: dict[str, list[Survivor]] = {}
        for survivor in survivors:
            if survivor.session_key:
                stopped.setdefault(survivor.session_key, []).append(survivor)
        for session_key, items in stopped.items():
            what = ", ".join(
                f"{s.kind}{' of ' + s.project if s.project else ''} (pid {s.pid})" for s in items
            )
            await self.send(
                SessionKey.parse(session_key),
                Reply(
                    f"podbay restarted after a crash and stopped what was still running from "
                    f"before: {what}. Nothing of it runs any more; resend if still needed.",
                    "error",
                ),
            )
        interrupted, received = await self.store.inbox_recover()
        # Known before the first message, so that from the first one on a prompt is told
        # from a mistyped command ("delete demo2 now") as it arrives (see _as_prompt).
        await self.store.project_names()
        # One line per interrupted run (listing the messages it was given), plus one for the
        # messages no run had taken yet: a batch of ten messages is one piece of lost work.
        by_session: dict[SessionKey, dict[int | None, list[InboxRow]]] = {}
        for row in interrupted:
            runs = by_session.setdefault(row.inbound.session, {})
            runs.setdefault(row.run_id, []).append(row)
        for key, runs in by_session.items():
            lines = [_interrupted_line(run_id, rows) for run_id, rows in list(runs.items())[:10]]
            if len(runs) > 10:
                lines.append(f"…and {len(runs) - 10} more.")
            await self.send(key, Reply("\n".join(lines), "error"))
        # From here to the end nothing awaits: no message can slip between the inbox read
        # above and opening the gate, and none is dispatched twice.
        held = dict(self._held)
        self._held.clear()
        self._replayed = {row.id for row in received}
        for row in received:
            # A held message is the original (a DM's secret still in it); prefer it.
            self._enqueue(row.id, held.pop(row.id, row.inbound))
        for inbox_id, inbound in held.items():
            self._enqueue(inbox_id, inbound)
        self._accepting = True

    async def drain(self) -> None:
        """Run everything queued (without waiting out coalescing windows) and wait for it."""
        self._flushing = True
        try:
            while self._sessions or self.engine.jobs.running():
                for state in self._sessions.values():
                    state.wake.set()
                if self._sessions:
                    self._idle.clear()
                    await self._idle.wait()
                await self.engine.jobs.wait_idle()
        finally:
            self._flushing = False

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop taking messages, give work ``grace_s`` to finish, then cancel the rest."""
        self._closed = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), grace_s)
        self._cancelling = True
        tasks: list[asyncio.Task[None]] = []
        for state in list(self._sessions.values()):
            state.front.clear()
            for task in (state.front_task, state.lane_task):
                if task is not None:
                    task.cancel()
                    tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.engine.jobs.cancel_all()

    def invariant_violations(self) -> list[str]:
        """Broken promises of the dispatcher (tests check this after every operation)."""
        problems: list[str] = []
        for key, state in self._sessions.items():
            if state.pending and (state.lane_task is None or state.lane_task.done()):
                problems.append(f"{key}: {len(state.pending)} pending message(s) without a lane")
            if state.front and (state.front_task is None or state.front_task.done()):
                problems.append(f"{key}: {len(state.front)} message(s) without a front lane")
        for key, state in self._sessions.items():
            if self._sessions.get(state.key) is not state:
                problems.append(f"{key}: session registered under the wrong key")
        return problems

    def snapshot(self) -> dict[str, object]:
        """Live numbers for status and benchmarks."""
        return {
            "sessions": len(self._sessions),
            "active_runs": self._slots.in_use,
            "waiting_for_slot": self._slots.waiting,
            "queued": {str(k): len(s.pending) for k, s in self._sessions.items() if s.pending},
            **self.stats,
        }


class Relay:
    """Relays one run's events to its conversation.

    Paragraphs are posted as they complete. Tool lines (verbosity 1, with details at 2) go
    into one progress message edited at most every ``edit_interval_s`` where the transport
    can edit; elsewhere they are posted in batches, before the next paragraph. The last
    message is a footer with duration, turns, tokens and cost, as far as they are known.
    """

    edit_interval_s = 1.5
    max_tool_lines = 12

    def __init__(
        self,
        dispatcher: Dispatcher,
        session: SessionKey,
        *,
        verbose: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dispatcher = dispatcher
        self._session = session
        self._verbose = verbose
        self._clock = clock
        self._started = clock()
        self._can_edit = dispatcher._can_edit(session)
        self._tools: list[str] = []
        self._unsent: list[str] = []  # tool lines not yet shown where edits are impossible
        self._progress: MessageRef | None = None
        self._edited_at = 0.0
        self._dirty = False

    async def event(self, event: AgentEvent) -> None:
        if isinstance(event, TextEvent):
            await self._flush_tools()
            await self._dispatcher.send(self._session, Reply(event.text, "agent"))
        elif isinstance(event, ToolEvent):
            if self._verbose <= 0:
                return
            line = event.summary
            if self._verbose >= 2 and event.detail and event.detail != event.summary:
                line += f"\n{code_block(event.detail[:1500])}"
            await self._tool(line)
        elif isinstance(event, NoticeEvent):
            await self._flush_tools()
            await self._dispatcher.send(self._session, Reply(event.text, "info"))
        else:
            await self._finish(event)

    async def _tool(self, line: str) -> None:
        self._tools.append(line)
        if not self._can_edit:
            self._unsent.append(line)
            return
        self._dirty = True
        now = self._clock()
        if self._progress is None or now - self._edited_at >= self.edit_interval_s:
            await self._show_progress(now)

    async def _show_progress(self, now: float) -> None:
        shown = self._tools[-self.max_tool_lines :]
        hidden = len(self._tools) - len(shown)
        text = "\n".join(([f"… {hidden} earlier step(s)"] if hidden else []) + shown)
        reply = Reply(text, "progress")
        if self._progress is None:
            self._progress = await self._dispatcher.send(self._session, reply)
        else:
            self._progress = await self._dispatcher.edit(self._progress, reply) or self._progress
        self._edited_at, self._dirty = now, False

    async def _flush_tools(self) -> None:
        if self._unsent:
            lines, self._unsent = self._unsent, []
            await self._dispatcher.send(self._session, Reply("\n".join(lines), "progress"))
        elif self._dirty:
            await self._show_progress(self._clock())

    async def _finish(self, finished: FinishedEvent) -> None:
        await self._flush_tools()
        footer = _footer(self._clock() - self._started, finished)
        if finished.ok:
            if footer:
                await self._dispatcher.send(self._session, Reply(f"_{footer}_", "info"))
            return
        what = {
            "rate_limit": "the model's API is rate-limiting podbay; wait and resend",
            "auth": "the model's API refused the credentials; check `[agent.env]`",
            "max_turns": "the agent hit its turn limit",
            "timeout": "it took too long",
        }.get(finished.failure, "")
        code = f" (exit {finished.exit_code})" if finished.exit_code is not None else ""
        reason = f" — {what}" if what else ""
        detail = finished.error.strip()
        body = f"\n{code_block(detail)}" if "\n" in detail or finished.exit_code else f" {detail}"
        tail = f"\n_{footer}_" if footer else ""
        await self._dispatcher.send(
            self._session, Reply(f"Agent run failed{code}{reason}:{body}{tail}", "error")
        )


def _footer(seconds: float, finished: FinishedEvent) -> str:
    """ "12 s · 3 turns · 1,234 tokens · $0.0123": only what the agent reported."""
    parts = [f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"]
    if finished.num_turns is not None:
        parts.append(f"{finished.num_turns} turn{'s' if finished.num_turns != 1 else ''}")
    tokens = sum(
        int(v)
        for k, v in finished.usage.items()
        if k.endswith("tokens") and isinstance(v, int) and not isinstance(v, bool)
    )
    if tokens:
        parts.append(f"{tokens:,} tokens")
    if finished.cost_usd is not None:
        parts.append(f"${finished.cost_usd:.4f}")
    if len(parts) == 1 and not finished.usage and finished.cost_usd is None:
        return ""  # a plain command agent reports nothing worth a footer
    return " · ".join(parts)


def _without(text: str, secret_values: Sequence[str]) -> str:
    """``text`` with every occurrence of the given secrets masked, longest first."""
    for value in sorted(set(secret_values), key=len, reverse=True):
        if value:
            text = text.replace(value, REDACTED)
    return text


def _kib(size: int) -> str:
    return f"{size / 1024:.0f} KiB" if size >= 1024 else f"{size} bytes"


def _interrupted_line(run_id: int | None, rows: Sequence[InboxRow], shown: int = 5) -> str:
    what = " · ".join(_excerpt(r.inbound.text, 60 if len(rows) > 1 else 80) for r in rows[:shown])
    if len(rows) > shown:
        what += f" · …and {len(rows) - shown} more"
    run = f" (run #{run_id})" if run_id is not None else ""
    return f"podbay restarted while working on: {what}{run}; resend if still needed"


def _excerpt(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
