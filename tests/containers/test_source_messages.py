"""Refusals about a project's source folder say what is there and what to do next."""

from __future__ import annotations

from docker_support import DockerHarness


async def test_a_kept_source_is_named_and_can_be_reused_with_path_as_it_is(
    dh: DockerHarness,
) -> None:
    await dh.ask("new project demo", "is ready")
    kept = dh.projects_root / "demo"
    (kept / "work.py").write_text("print('keep me')\n")
    await dh.ask("delete demo", "Reply `confirm`")
    deleted = await dh.ask("confirm", "Deleted `demo`")
    assert f"--path {kept}` reuses it" in deleted
    reply = await dh.ask("new project demo", "kept when project `demo` was deleted")
    assert f"To reuse it as it is: `new project demo --path {kept}`" in reply
    assert f"`new project demo --path {dh.projects_root / 'demo-2'}`" in reply
    assert f"`rm -rf {kept}`" in reply
    assert await dh.store.project_get("demo") is None
    # Reuse fails in plan (bad memory): nothing of the kept source is touched.
    await dh.ask(f"new project again --path {kept} --memory 1b", "--memory")
    assert (kept / "work.py").read_text() == "print('keep me')\n"
    ready = await dh.ask(f"new project again --path {kept}", "is ready")
    assert "again" in ready
    assert (kept / "work.py").read_text() == "print('keep me')\n"
    assert (kept / ".git").is_dir(), "the repository is kept as it was"
    # Once taken over it is a project's source again, not a kept one.
    assert await dh.store.kept_source_get(str(kept)) is None


async def test_a_folder_with_files_that_podbay_did_not_keep_is_never_taken_over(
    dh: DockerHarness,
) -> None:
    mine = dh.projects_root / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("private")
    reply = await dh.ask(f"new project taker --path {mine}", "not an empty directory")
    assert "new project taker --path" in reply
    assert (mine / "notes.txt").read_text() == "private"
    assert await dh.store.project_get("taker") is None


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
