"""Transports are plugins: one found through the entry point group gets its config section,
is written by `podbay init`, and is started by `podbay run`'s wiring, with no change to
podbay's own files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from podbay.config import default_config_toml, load_settings
from podbay.transports.plugins import discover

PLUGIN = """
from pydantic import Field
from podbay.configbase import TransportSection
from podbay.messages import MessageRef
from podbay.transports.base import Capabilities
from podbay.transports.plugins import TransportPlugin


class PagerConfig(TransportSection):
    enabled: bool = Field(False, description="Serve the pager.")
    pager_number: str = Field("", description="Where pages go.")


class Pager:
    name = "pager"
    capabilities = Capabilities()

    def __init__(self, config, http):
        self.config = config
        http.add_route("POST", "/pager/hook", self.hook)

    async def hook(self, request): ...
    async def start(self, submit): ...
    async def send(self, session, reply): return MessageRef(session, ())
    async def edit(self, ref, reply): return ref
    async def typing(self, session, active): ...
    async def redact(self, session, platform_id, reason): return False
    async def stop(self): ...


PLUGIN = TransportPlugin(
    name="pager",
    config=PagerConfig,
    create=lambda context: Pager(context.config("pager"), context.http),
)
"""

PROBE = """
from podbay.bot import Podbay
from podbay.config import default_config_toml, load_settings

settings, _ = load_settings()
bot = Podbay(settings, docker=False)
print("transports:", [t.name for t in bot.transports])
print("number:", settings.transport_config("pager").pager_number)
print("routes:", bot.http.routes)
print("init has section:", "[transports.pager]" in default_config_toml())
"""


def test_a_transport_from_another_package_plugs_in(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "podbay_pager-0.1.dist-info").mkdir(parents=True)
    (site / "podbay_pager.py").write_text(PLUGIN)
    (site / "podbay_pager-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: podbay-pager\nVersion: 0.1\n"
    )
    (site / "podbay_pager-0.1.dist-info" / "entry_points.txt").write_text(
        "[podbay.transports]\npager = podbay_pager:PLUGIN\n"
    )
    config = tmp_path / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            data_dir = "{tmp_path / "data"}"
            [transports.pager]
            enabled = true
            pager_number = "+15550100"
            """
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *sys.path]),
        "PODBAY_CONFIG": str(config),
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "transports: ['pager']" in out.stdout
    assert "number: +15550100" in out.stdout
    assert "routes: [('POST', '/pager/hook')]" in out.stdout
    assert "init has section: True" in out.stdout


def test_built_in_transports_are_plugins_and_init_writes_their_sections(tmp_path: Path) -> None:
    assert {"console", "matrix", "slack", "whatsapp"} <= set(discover())
    text = default_config_toml()
    for name in ("console", "matrix", "slack", "whatsapp"):
        section = f"[transports.{name}]"
        assert section in text
    config = tmp_path / "config.toml"
    config.write_text(text)
    settings, _ = load_settings(config)  # what `podbay init` writes loads back as is
    assert settings.transport_config("slack").mode == "http"
    assert not settings.transport_config("slack").enabled
