"""Fixtures for the WhatsApp tests (the world itself lives in wa_world.py)."""

from wa_world import meta_world, twilio_world

__all__ = ["meta_world", "twilio_world"]
