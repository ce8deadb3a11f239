"""Fixtures for the WhatsApp tests (the world itself lives in fakes/wa_world.py)."""

from fakes.wa_world import meta_world, twilio_world

__all__ = ["meta_world", "twilio_world"]
