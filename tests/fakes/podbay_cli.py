"""The real `podbay` command as a subprocess: start it, crash it, run it again."""

from __future__ import annotations

import signal
import subprocess
import sys


def start_podbay(env: dict[str, str], command: str = "run") -> subprocess.Popen[str]:
    """`podbay <command>` in the background, fed through its stdin (output discarded)."""
    return subprocess.Popen(
        [sys.executable, "-m", "podbay", command],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def crash(proc: subprocess.Popen[str]) -> None:
    """`kill -9` podbay: no shutdown code of its own runs."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def chat(env: dict[str, str], stdin: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`podbay chat` with ``stdin`` piped in, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "podbay", "chat"],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
