"""Refusals about a project's source folder say what is there and what to do next."""

from __future__ import annotations

from docker_support import DockerHarness


async def test_new_project_over_a_kept_source_says_how_to_use_another_folder_or_clear_it(
    dh: DockerHarness,
) -> None:
    await dh.ask("new project demo", "is ready")
    await dh.ask("delete demo", "Reply `confirm`")
    await dh.ask("confirm", "Deleted `demo`")
    kept = dh.projects_root / "demo"
    reply = await dh.ask("new project demo", "not an empty directory")
    assert f"`{kept}` already exists and is not an empty directory" in reply
    assert "source kept when a project `demo` was deleted" in reply
    assert f"`new project demo --path {dh.projects_root / 'demo-2'}`" in reply
    assert f"`mv {kept} {kept}.old`" in reply
    assert await dh.store.project_get("demo") is None


async def test_a_path_inside_another_projects_source_names_that_project_even_if_it_has_files(
    dh: DockerHarness,
) -> None:
    await dh.ask("new project outer", "is ready")
    source = dh.projects_root / "outer"
    (source / "sub").mkdir()
    (source / "sub" / "code.py").write_text("print('mine')\n")
    inside = await dh.ask(f"new project inner --path {source / 'sub'}", str(source / "sub"))
    assert f"`{source / 'sub'}` is inside the source of project `outer`" in inside
    assert "not an empty directory" not in inside
    same = await dh.ask(f"new project twin --path {source}", str(source))
    assert f"`{source}` is already the source of project `outer`" in same
    taken = await dh.ask("new project outer", "already exists")
    assert "A project named `outer` already exists" in taken
    assert [p.name for p in await dh.store.project_list()] == ["outer"]
