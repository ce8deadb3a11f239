"""A clone that hangs when podbay is killed can never touch the project re-created later."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

from docker_support import ca_toml, container_settings, remove_instance_containers
from fakes.podbay_cli import chat, crash, start_podbay

from podbay.engine.lifecycle import instance_id
from podbay.engine.procs import start_ticks


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never says a word: TLS hangs forever."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.connected.set()

    def hang_up(self) -> None:
        """Close every connection: a git still waiting on one gives up (and cleans up)."""
        for conn in self.conns:
            conn.close()

    def close(self) -> None:
        self.hang_up()
        self.sock.close()


def processes_mentioning(text: str) -> dict[int, int]:
    """pid -> start_ticks of every live process whose command line contains ``text``."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ticks = start_ticks(int(entry))
        if text.encode() in cmdline and ticks is not None:
            found[int(entry)] = ticks
    return found


def test_a_clone_orphaned_by_kill_9_is_killed_and_cannot_delete_the_new_project(
    docker_engine: None, tmp_path: Path
) -> None:
    settings = container_settings(tmp_path, ready_timeout_s=300)
    projects = tmp_path / "projects"
    projects.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[access]
admins = ["console:*"]
[projects]
root = "{projects}"
[docker]
network = "host"
name_prefix = "{settings.docker.name_prefix}"
ready_timeout_s = 300
"""
        + ca_toml()
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
    env |= {"PODBAY_CONFIG": str(config), "PODBAY_DATA_DIR": str(settings.data_dir)}
    instance = instance_id(settings.data_dir)
    server = SilentServer()
    url = f"https://127.0.0.1:{server.port}/x.git"
    proc = start_podbay(env)
    old_git: dict[int, int] = {}
    try:
        assert proc.stdin is not None
        proc.stdin.write(f"new project hang1 --git {url}\n")
        proc.stdin.flush()
        assert server.connected.wait(300), "git never connected"
        old_git = processes_mentioning(f"127.0.0.1:{server.port}")
        assert old_git, "no git process found: the test proves nothing"
        crash(proc)

        result = chat(env, "new project hang1\n", timeout=600)
        assert result.returncode == 0, result.stderr
        assert "hang1 is ready" in result.stdout or "`hang1` is ready" in result.stdout, (
            result.stdout
        )
        still = {pid: ticks for pid, ticks in old_git.items() if start_ticks(pid) == ticks}
        assert not still, f"the old clone still runs: {still}"
        # Were any old git alive, this is when it would give up and delete the new .git.
        server.hang_up()
        assert (projects / "hang1" / ".git").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        server.close()
        for pid, ticks in old_git.items():
            if start_ticks(pid) == ticks:
                os.kill(pid, signal.SIGKILL)
        remove_instance_containers(instance, settings)
