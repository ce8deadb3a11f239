"""Agent runs as a user sees them: relayed events, footer, verbosity, context, run commands."""

from __future__ import annotations

import pytest
from fakes.agent import FakeAgent
from fakes.harness import Harness
from fakes.transport import MemoryTransport

from podbay.config import Settings
from podbay.engine.agents import FinishedEvent, NoticeEvent, TextEvent, ToolEvent
from podbay.messages import SessionKey

ROOM = SessionKey("memory", "room-1")

SCRIPT = [
    ToolEvent("Write", "🔧 Write hello.txt", "Write /workspace/hello.txt (12 bytes)"),
    ToolEvent("Bash", "🔧 Bash: pytest -q", "pytest -q --maxfail=1"),
    TextEvent("I wrote hello.txt and the tests pass."),
    FinishedEvent(
        ok=True,
        num_turns=3,
        usage={"input_tokens": 1000, "output_tokens": 234},
        cost_usd=0.0123,
        agent_session_id="sess-1",
    ),
]


async def test_tool_lines_answer_and_footer_reach_the_chat(
    harness: Harness, agent: FakeAgent
) -> None:
    agent.auto_release = 0.0
    agent.script = SCRIPT
    await harness.transport.say("make hello.txt")
    await harness.dispatcher.drain()
    texts = harness.transport.texts(ROOM)
    assert "🔧 Write hello.txt\n🔧 Bash: pytest -q" in texts
    assert "I wrote hello.txt and the tests pass." in texts
    footer = texts[-1]
    assert "3 turns" in footer and "1,234 tokens" in footer and "$0.0123" in footer
    assert texts.index("🔧 Write hello.txt\n🔧 Bash: pytest -q") < texts.index(
        "I wrote hello.txt and the tests pass."
    )
    (run,) = await harness.store.runs_recent(session=ROOM)
    assert run.status == "succeeded" and run.num_turns == 3 and run.cost_usd == 0.0123
    kinds = [kind for _, kind, _ in await harness.store.run_events(run.id)]
    assert kinds == ["tool", "tool", "text"]


@pytest.mark.parametrize(
    ("level", "shows_tools", "shows_detail"),
    [("0", False, False), ("1", True, False), ("2", True, True)],
)
async def test_verbosity_sets_how_much_tool_detail_is_shown(
    harness: Harness, agent: FakeAgent, level: str, shows_tools: bool, shows_detail: bool
) -> None:
    agent.auto_release = 0.0
    agent.script = SCRIPT
    await harness.transport.say(f"verbose {level}")
    await harness.transport.wait_for_text(f"Verbosity here is now {level}")
    await harness.transport.say("make hello.txt")
    await harness.dispatcher.drain()
    joined = "\n".join(harness.transport.texts(ROOM))
    assert ("🔧 Write hello.txt" in joined) is shows_tools
    assert ("pytest -q --maxfail=1" in joined) is shows_detail
    assert "I wrote hello.txt" in joined


async def test_on_a_transport_that_edits_tool_lines_share_one_progress_message(
    harness: Harness, agent: FakeAgent
) -> None:
    edits: list[str] = []
    transport = harness.transport

    async def edit(ref: object, reply: object) -> object:
        edits.append(reply.text)  # type: ignore[attr-defined]
        return ref

    transport.capabilities = type(transport.capabilities)(edits=True)
    transport.edit = edit  # type: ignore[method-assign]
    agent.auto_release = 0.0
    agent.script = [ToolEvent("Read", f"🔧 Read f{i}.py") for i in range(20)] + [
        TextEvent("Read them all."),
        FinishedEvent(ok=True),
    ]
    await transport.say("read everything")
    await harness.dispatcher.drain()
    progress = transport.texts(ROOM, kind="progress")
    assert len(progress) == 1, "one progress message, edited in place"
    last_view = edits[-1] if edits else progress[0]
    assert "🔧 Read f19.py" in last_view, "the final state of the steps is shown"
    assert "earlier step(s)" in last_view


async def test_notices_and_failures_are_reported_as_such(
    harness: Harness, agent: FakeAgent
) -> None:
    agent.auto_release = 0.0
    agent.script = [
        NoticeEvent("The earlier agent conversation was not found; started a fresh one."),
        FinishedEvent(ok=False, error="429 rate_limit_error", failure="rate_limit"),
    ]
    await harness.transport.say("go")
    await harness.dispatcher.drain()
    texts = harness.transport.texts(ROOM)
    assert "started a fresh one" in texts[0]
    assert "rate-limiting" in texts[-1] and "429" in texts[-1]
    (run,) = await harness.store.runs_recent(session=ROOM)
    assert run.status == "failed"


async def test_the_agent_is_told_what_happened_to_the_project_since_its_last_turn(
    harness: Harness, agent: FakeAgent
) -> None:
    agent.auto_release = 0.0
    store = harness.store
    await store.project_add("demo", "/nonexistent/demo", state="ready")
    await store.session_set_project(ROOM, "demo")
    await harness.transport.say("first turn")
    await harness.dispatcher.drain()
    assert agent.prompts() == ["first turn"], "nothing to tell on a first turn"
    await store.event_add("demo", "restart", "the container was restarted")
    await store.event_add("demo", "job failed", "`rebuild` failed: image build failed")
    await harness.transport.say("second turn")
    await harness.dispatcher.drain()
    second = agent.prompts()[1]
    assert second.startswith("[podbay: since your last turn in this conversation:")
    assert "the container was restarted" in second and "`rebuild` failed" in second
    assert second.endswith("second turn")
    await harness.transport.say("third turn")
    await harness.dispatcher.drain()
    assert agent.prompts()[2] == "third turn", "told once"


async def test_runs_run_and_delete_run(harness: Harness, agent: FakeAgent) -> None:
    await harness.transport.say("long work")
    running = await agent.next_started()
    (active,) = await harness.store.runs_active()
    await harness.transport.say(f"delete run {active.id}")
    refusal = await harness.transport.wait_for_text("cannot be deleted while it runs")
    assert f"Run #{active.id} is running" in refusal
    running.release.set()
    await harness.dispatcher.drain()
    await harness.transport.say("runs")
    listing = await harness.transport.wait_for_text("Recent runs")
    assert f"#{active.id} succeeded" in listing and "'long work'" in listing
    await harness.transport.say(f"run {active.id}")
    details = await harness.transport.wait_for_text("last output")
    assert "echo: long work" in details
    await harness.transport.say(f"delete run {active.id}")
    await harness.transport.wait_for_text(f"Deleted run #{active.id}")
    assert await harness.store.run_get(active.id) is None
    await harness.transport.say(f"run {active.id}")
    await harness.transport.wait_for_text(f"No run #{active.id}")


async def test_run_followed_by_words_is_a_prompt_not_a_command(
    harness: Harness, agent: FakeAgent
) -> None:
    agent.auto_release = 0.0
    await harness.transport.say("run tests")
    await harness.dispatcher.drain()
    assert agent.prompts() == ["run tests"]


async def test_a_container_agent_with_no_active_project_explains_what_to_do(
    settings: Settings,
) -> None:
    from podbay.commands.catalog import build_registry
    from podbay.dispatcher import Dispatcher
    from podbay.engine.core import Engine
    from podbay.engine.store import Store

    settings.agent.preset = "claude"
    settings.agent.where = "container"
    async with await Store.open(settings.data_dir / "podbay.db") as store:
        dispatcher = Dispatcher(Engine(store, settings), build_registry(), settings)
        transport = MemoryTransport()
        dispatcher.attach(transport)
        await transport.start(dispatcher.submit)
        await dispatcher.recover()
        await transport.say("fix the bug")
        reply = await transport.wait_for_text("No active project")
        assert "`use <project>`" in reply and "`new project <name>`" in reply
        (run,) = await store.runs_recent()
        assert run.status == "failed"
        await dispatcher.shutdown()


async def test_finished_and_failed_jobs_become_events_for_the_agent(harness: Harness) -> None:
    from podbay.engine.jobs import JobHandle
    from podbay.errors import UserError

    async def fine(handle: JobHandle) -> str:
        return "restarted"

    async def broken(handle: JobHandle) -> str:
        raise UserError("image build failed")

    async def quiet(text: str) -> None:
        return None

    jobs = harness.engine.jobs
    await jobs.submit("demo", "restart", fine, session=ROOM, requested_by="t", notify=quiet)
    await jobs.wait_idle()
    await jobs.submit("demo", "rebuild", broken, session=ROOM, requested_by="t", notify=quiet)
    await jobs.wait_idle()
    texts = [e.text for e in await harness.store.events_since("demo", 0)]
    assert texts == ["the container was restarted", "`rebuild` failed: image build failed"]
