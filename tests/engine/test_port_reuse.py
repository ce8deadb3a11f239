"""A freed SSH port goes back to the end of the line: fresh ports first, then the longest freed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from podbay.engine.store import Store


@pytest.fixture(params=["memory", "file"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    path = ":memory:" if request.param == "memory" else tmp_path / "podbay.db"
    clock = [1000.0]
    async with await Store.open(path, clock=lambda: clock[0]) as opened:
        opened.test_clock = clock  # type: ignore[attr-defined]
        yield opened


def always_free(port: int) -> bool:
    return True


async def reserve(store: Store, name: str) -> int:
    row = await store.project_reserve(
        name, f"/src/{name}", port_range=(2200, 2202), port_is_free=always_free
    )
    assert row.ssh_port is not None
    return row.ssh_port


async def test_a_deleted_projects_port_is_not_handed_out_while_fresh_ones_are_free(
    store: Store,
) -> None:
    assert await reserve(store, "a") == 2200
    await store.project_remove("a")
    assert await reserve(store, "b") == 2201
    assert await reserve(store, "c") == 2202


async def test_when_only_freed_ports_are_left_the_one_freed_longest_ago_comes_first(
    store: Store,
) -> None:
    for name in ("a", "b", "c"):
        await reserve(store, name)
    clock: list[float] = store.test_clock  # type: ignore[attr-defined]
    await store.project_remove("b")  # 2201 freed first
    clock[0] += 10
    await store.project_remove("a")  # 2200 freed later
    assert await reserve(store, "d") == 2201
    assert await reserve(store, "e") == 2200


async def test_a_port_that_is_bound_is_skipped_even_if_it_comes_first(store: Store) -> None:
    row = await store.project_reserve(
        "a", "/src/a", port_range=(2200, 2202), port_is_free=lambda p: p != 2200
    )
    assert row.ssh_port == 2201
