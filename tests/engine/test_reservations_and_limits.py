"""Reservations of name, source folder and SSH port; Docker's resource bounds; URL secrets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from podbay.engine.git import parse_status_v2
from podbay.engine.projects import check_cpus, parse_memory, split_url_credentials
from podbay.engine.ssh import port_is_free
from podbay.engine.store import Store
from podbay.errors import StoreError, UserError


@pytest.fixture(params=["memory", "file"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    path = ":memory:" if request.param == "memory" else tmp_path / "podbay.db"
    async with await Store.open(path) as opened:
        yield opened


def always_free(port: int) -> bool:
    return True


async def test_reservations_at_once_get_distinct_ports(store: Store) -> None:
    rows = await asyncio.gather(
        *(
            store.project_reserve(f"p{i}", f"/src/p{i}", port_range=(2200, 2299),
                                  port_is_free=always_free)
            for i in range(5)
        )
    )  # fmt: skip
    assert sorted(r.ssh_port for r in rows) == [2200, 2201, 2202, 2203, 2204]
    assert {r.state for r in rows} == {"creating"}


@pytest.mark.parametrize(
    ("second", "relation"),
    [
        ("/src/app", "is already the source of"),
        ("/src/app/sub", "is inside the source of"),
        ("/src", "contains the source of"),
    ],
)
async def test_a_path_equal_inside_or_above_another_projects_is_refused(
    store: Store, second: str, relation: str
) -> None:
    await store.project_reserve(
        "one", "/src/app", port_range=(2200, 2201), port_is_free=always_free
    )
    with pytest.raises(
        StoreError, match=f"Cannot create `two`: `{second}` {relation} project `one`"
    ):
        await store.project_reserve(
            "two", second, port_range=(2200, 2201), port_is_free=always_free
        )
    assert [r.name for r in await store.project_list()] == ["one"]


async def test_a_sibling_with_a_common_prefix_is_not_an_overlap(store: Store) -> None:
    await store.project_reserve(
        "one", "/src/app", port_range=(2200, 2201), port_is_free=always_free
    )
    row = await store.project_reserve(
        "two", "/src/app2", port_range=(2200, 2201), port_is_free=always_free
    )
    assert row.ssh_port == 2201


async def test_a_port_bound_on_loopback_is_skipped_and_a_full_range_is_refused(
    store: Store,
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        row = await store.project_reserve(
            "one", "/a", port_range=(taken, taken + 1), port_is_free=port_is_free
        )
        assert row.ssh_port != taken
        with pytest.raises(StoreError, match="No free SSH port left"):
            await store.project_reserve(
                "two", "/b", port_range=(taken, taken + 1), port_is_free=port_is_free
            )
    with pytest.raises(StoreError, match="already exists"):
        await store.project_reserve("one", "/c", port_range=(1, 2), port_is_free=always_free)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("6m", 6 * 1024**2), ("512m", 512 * 1024**2), ("4g", 4 * 1024**3), ("1.5g", 1536 * 1024**2),
     ("4gb", 4 * 1024**3), ("7000000", 7_000_000), ("8192k", 8 * 1024**2)],
)  # fmt: skip
def test_memory_sizes_docker_accepts(raw: str, expected: int) -> None:
    assert parse_memory(raw) == expected


@pytest.mark.parametrize(
    ("raw", "error"),
    [("0", "at least 6m"), ("1b", "at least 6m"), ("5m", "at least 6m"),
     ("99999999999999999999g", "too large"), ("lots", "takes a size"), ("-1g", "takes a size"),
     ("1e9", "takes a size")],
)  # fmt: skip
def test_memory_sizes_docker_refuses_are_refused_clearly(raw: str, error: str) -> None:
    with pytest.raises(UserError, match=error):
        parse_memory(raw)


def test_cpu_limits_between_a_hundredth_and_the_engines_cpus() -> None:
    assert check_cpus(0.01, 2) == 0.01 and check_cpus(2, 2) == 2
    with pytest.raises(UserError, match=r"at least 0\.01"):
        check_cpus(0.0001, 2)
    with pytest.raises(UserError, match="this Docker engine has only 2 CPUs"):
        check_cpus(256, 2)
    with pytest.raises(UserError, match=r"at least 0\.01"):
        check_cpus(float("nan"), 2)


@pytest.mark.parametrize(
    ("url", "clean", "credential"),
    [
        ("https://user:PASS@host/r.git", "https://host/r.git", ("user", "PASS")),
        ("https://u:p%40ss@h:8443/o/r", "https://h:8443/o/r", ("u", "p%40ss")),
        ("https://user@host/r.git", "https://user@host/r.git", None),
        ("https://host/r.git", "https://host/r.git", None),
        ("ssh://git@host/r.git", "ssh://git@host/r.git", None),
        ("git@host:o/r.git", "git@host:o/r.git", None),
    ],
)
def test_a_password_is_split_off_a_git_url(
    url: str, clean: str, credential: tuple[str, str] | None
) -> None:
    assert split_url_credentials(url) == (clean, credential)


def test_a_password_in_an_ssh_url_is_refused() -> None:
    with pytest.raises(UserError, match="ssh uses keys"):
        split_url_credentials("ssh://git:secret@host/r.git")


def test_porcelain_v2_status_is_summarised() -> None:
    text = (
        "# branch.oid 1234abcd\n# branch.head main\n# branch.upstream origin/main\n"
        "# branch.ab +2 -1\n1 .M N... 100644 100644 100644 a a f.py\n? new.txt\n"
    )
    state = parse_status_v2(text)
    assert (state.branch, state.dirty, state.ahead, state.behind) == ("main", 2, 2, 1)
    fresh = parse_status_v2("# branch.oid (initial)\n# branch.head master\n")
    assert (fresh.branch, fresh.dirty) == ("master (no commits)", 0)
