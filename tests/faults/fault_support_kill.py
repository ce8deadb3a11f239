"""Helpers for the kill -9 and Docker-restart fault tests (tests/faults/test_kill_recovery.py,
tests/faults/test_docker_restart.py).

* :class:`LivePodbay`: the real `podbay run` as a subprocess (the console is its only
  transport), whose replies are read line by line by a thread; tests wait for a reply with
  :meth:`LivePodbay.wait_for`, which wakes on each new line (no polling) and gives up after
  a timeout with everything podbay said.
* :class:`ContainerEvents`: the Docker engine's event stream for one podbay instance's
  containers, read by a thread; :meth:`ContainerEvents.wait_for` wakes on each event.
* :class:`Signal`: a TCP listener on 127.0.0.1 that an agent script connects to, to say
  "I am running" (with its pids) at the moment it happens.
* Small readers of podbay's database (read-only sqlite3) and of /proc.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

from fakes.podbay_cli import crash

from podbay.engine.procs import TAG_VAR, start_ticks

# -- podbay ---------------------------------------------------------------------------------


class LivePodbay:
    """`podbay run` with the console transport; stdin lines are messages, stdout replies."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self._log = log
        self._err = log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "podbay", "run"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env=env,
        )
        self._lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def mark(self) -> int:
        """A position in the output: ``wait_for(since=mark)`` looks only after it."""
        with self._cond:
            return len(self._lines)

    def output(self, since: int = 0) -> str:
        with self._cond:
            return "".join(self._lines[since:])

    def say(self, text: str) -> int:
        """Send one console line; returns the output position from before it."""
        since = self.mark()
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return since

    def wait_for(self, needle: str, *, since: int = 0, timeout: float = 120) -> str:
        """The output after ``since`` once it contains ``needle`` (case-sensitive)."""

        def found() -> bool:
            return needle in "".join(self._lines[since:]) or self._eof

        with self._cond:
            self._cond.wait_for(found, timeout)
            text = "".join(self._lines[since:])
        if needle not in text:
            why = "podbay exited" if self._eof else f"no such reply within {timeout:g} s"
            raise AssertionError(
                f"{why}: waited for {needle!r}; podbay said:\n{text}\n"
                f"--- its log:\n{self.log_tail()}"
            )
        return text

    def log_tail(self, lines: int = 30) -> str:
        self._err.flush()
        try:
            return "\n".join(self._log.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def crash(self) -> None:
        """kill -9: none of podbay's shutdown code runs."""
        crash(self.proc)
        self._reader.join(timeout=10)

    def finish(self, timeout: float = 120) -> int:
        """End of input: `podbay run` on the console stops (gracefully); its exit code."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def close(self) -> None:
        """Whatever state it is in: gone afterwards (for finally blocks)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with suppress(OSError):
                    stream.close()
        self._err.close()

    def __enter__(self) -> LivePodbay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def podbay_env(tmp_path: Path, config: str, **extra: str) -> dict[str, str]:
    """The test's environment minus PODBAY_*, with this config and data dir, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
    path = tmp_path / "config.toml"
    path.write_text(config)
    env |= {
        "HOME": str(tmp_path / "home"),
        "PODBAY_CONFIG": str(path),
        "PODBAY_DATA_DIR": str(tmp_path / "data"),
        **extra,
    }
    return env


# -- an agent's "I am running" ----------------------------------------------------------------


class Signal:
    """One TCP connection from an agent script on 127.0.0.1: ``receive`` returns what it sent."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    def receive(self, timeout: float = 60) -> str:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(timeout)
            chunks = []
            while chunk := conn.recv(4096):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def close(self) -> None:
        self.sock.close()


# -- Docker -----------------------------------------------------------------------------------


class ContainerEvents:
    """The engine's container events for the containers of podbay instance ``instance``."""

    def __init__(self, instance: str, environment: dict[str, str] | None = None) -> None:
        from docker.client import DockerClient

        self.client = DockerClient.from_env(timeout=60, environment=environment)
        self._stream = self.client.events(
            decode=True,
            filters={"type": "container", "label": f"podbay.instance={instance}"},
        )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for event in self._stream:
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_for(
        self,
        action: str,
        project: str,
        *,
        timeout: float,
        alive: Callable[[], bool] = lambda: True,
    ) -> dict[str, Any]:
        """The first event ``action`` (create, start, kill, die, destroy ...) of the container
        of ``project``; fails after ``timeout`` s, or as soon as ``alive()`` turns False
        when the next event arrives (then the event cannot come any more)."""

        def match() -> dict[str, Any] | None:
            for event in self.events:
                attrs = event.get("Actor", {}).get("Attributes", {})
                if event.get("Action") == action and attrs.get("podbay.project") == project:
                    return event
            return None

        deadline = time.monotonic() + timeout
        with self._cond:
            while (found := match()) is None:
                left = deadline - time.monotonic()
                assert left > 0, f"no {action} event for {project} within {timeout:g} s"
                assert alive(), f"gave up waiting for {action} of {project}"
                self._cond.wait(min(left, 5.0))
        return found

    def close(self) -> None:
        self._stream.close()
        self._thread.join(timeout=10)
        self.client.close()


def instance_containers(instance: str, environment: dict[str, str] | None = None) -> list[Any]:
    """Every container (running or not) labelled for podbay instance ``instance``."""
    from docker.client import DockerClient

    client = DockerClient.from_env(timeout=60, environment=environment)
    try:
        return list(
            client.containers.list(all=True, filters={"label": f"podbay.instance={instance}"})
        )
    finally:
        client.close()


def volume_names(prefix: str, environment: dict[str, str] | None = None) -> list[str]:
    from docker.client import DockerClient

    client = DockerClient.from_env(timeout=60, environment=environment)
    try:
        return [v.name for v in client.volumes.list() if v.name.startswith(prefix)]
    finally:
        client.close()


def remove_instance(
    instance: str, volume_prefix: str, environment: dict[str, str] | None = None
) -> None:
    """Remove what a test's podbay created on the engine (and only that)."""
    from docker.client import DockerClient

    client = DockerClient.from_env(timeout=60, environment=environment)
    try:
        for container in client.containers.list(
            all=True, filters={"label": f"podbay.instance={instance}"}
        ):
            container.remove(force=True, v=True)
        for volume in client.volumes.list():
            if volume.name.startswith(volume_prefix):
                volume.remove(force=True)
    finally:
        client.close()


def local_ca_certs() -> list[Path]:
    """CAs this machine added locally (a TLS-intercepting proxy): image builds trust them."""
    return sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))


def toml_list(paths: list[Path]) -> str:
    return "[" + ", ".join(f'"{p}"' for p in paths) + "]"


# -- podbay's database and /proc ---------------------------------------------------------------


def query(db: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` from podbay's database, read-only (podbay may be running)."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        return [tuple(row) for row in conn.execute(sql, args).fetchall()]


def tagged_processes(prefix: str) -> dict[int, str]:
    """pid -> PODBAY_PROCESS tag of every live process whose tag starts with ``prefix``."""
    needle = f"{TAG_VAR}={prefix}".encode()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(needle) and start_ticks(int(entry)) is not None:
                found[int(entry)] = item.decode(errors="replace").partition("=")[2]
    return found


# -- a private Docker engine ------------------------------------------------------------------


class PrivateDockerd:
    """A second dockerd of this test's own (socket, data, state in ``base``), which the test
    may stop and start again without touching the engine every other test uses.

    No bridge, no iptables rules, no IP forwarding (podbay's containers use the host
    network); the storage driver is the main engine's. ``base`` must be a short path: the
    engine's containerd puts unix sockets under it (at most 108 bytes).
    """

    def __init__(self, base: Path, storage_driver: str) -> None:
        self.base = base
        self.socket = base / "docker.sock"
        self.host = f"unix://{self.socket}"
        (base / "daemon.json").write_text("{}\n")  # not /etc/docker/daemon.json
        self.args = [
            "dockerd",
            f"--host={self.host}",
            f"--data-root={base / 'root'}",
            f"--exec-root={base / 'exec'}",
            f"--pidfile={base / 'docker.pid'}",
            f"--config-file={base / 'daemon.json'}",
            f"--storage-driver={storage_driver}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
        ]
        self.proc: subprocess.Popen[str] | None = None
        self._reader = threading.Thread()
        self._log = (base / "dockerd.log").open("a")
        self._listening = threading.Event()

    @property
    def environment(self) -> dict[str, str]:
        """For DockerClient.from_env(environment=...) and for podbay's environment."""
        return {"DOCKER_HOST": self.host}

    def start(self, timeout: float = 120) -> None:
        """Start it and wait until its API listens (it says so in its log)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._listening.clear()
        proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.proc = proc

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self._log.write(line)
                if "API listen on" in line:
                    self._log.flush()
                    self._listening.set()
            proc.stderr.close()
            self._log.flush()
            self._listening.set()  # it exited: the waiter must not wait out its timeout

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        assert self._listening.wait(timeout), f"dockerd did not listen within {timeout:g} s"
        assert proc.poll() is None, "dockerd exited at start:\n" + self.log_tail()

    def stop(self, timeout: float = 120) -> None:
        """SIGTERM, as `systemctl stop docker` does, and wait until it has exited."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"dockerd did not stop within {timeout:g} s") from None
        finally:
            self._reader.join(timeout=30)

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join((self.base / "dockerd.log").read_text().splitlines()[-lines:])

    def close(self) -> None:
        """Stop it for good (and its containerd, should one outlive it)."""
        try:
            self.stop()
        finally:
            pidfile = self.base / "exec" / "containerd" / "containerd.pid"
            with suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().strip()), 9)
            self._log.close()
            # dockerd leaves its network namespace mounted (exec/netns/default): unmounted,
            # the folder can be removed.
            points = [
                line.split()[4]
                for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if line.split()[4].startswith(f"{self.base}/")
            ]
            for point in sorted(points, key=len, reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
