"""Fixtures for the Slack tests (the world itself lives in fakes/slack_world.py, importable by
name from any test directory)."""

from fakes.slack_world import slack_world, socket_world

__all__ = ["slack_world", "socket_world"]
