"""Piped input to the real `podbay chat`: every line of a burst reaches one agent run."""

from __future__ import annotations

from pathlib import Path

from test_cli import agent_config, podbay

# The agent prints how many runs it has seen and the prompt it got.
AGENT = """
import pathlib, sys
marker = pathlib.Path(sys.argv[0]).with_name("runs")
count = int(marker.read_text()) + 1 if marker.exists() else 1
marker.write_text(str(count))
print(f"run {count}: " + " | ".join(sys.stdin.read().split("\\n\\n")))
"""


def test_end_of_input_gives_one_run_for_a_burst(tmp_path: Path) -> None:
    # A long window: the burst must stay whole because of end of input, not because of luck.
    config = agent_config(tmp_path, AGENT).replace(
        "coalesce_window_ms = 200", "coalesce_window_ms = 5000\nmax_window_ms = 10000"
    )
    result = podbay(tmp_path, "chat", stdin="one\ntwo\nthree\n", config=config)
    assert result.returncode == 0, result.stderr
    assert "run 1: one | two | three" in result.stdout
    assert "run 2" not in result.stdout
