"""Roles: viewer < operator < admin, granted by ``[access]``."""

from __future__ import annotations

from enum import IntEnum

from podbay.config import AccessConfig, identity_matches


class Role(IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def with_article(self) -> str:
        """The label with its article ("an operator"), for "you are ..." in replies."""
        return f"{'an' if self.label[0] in 'aeiou' else 'a'} {self.label}"


def role_for(identity: str, access: AccessConfig) -> Role | None:
    """The highest role ``identity`` holds, or None for an unknown sender."""
    for role, patterns in (
        (Role.ADMIN, access.admins),
        (Role.OPERATOR, access.operators),
        (Role.VIEWER, access.viewers),
    ):
        if any(identity_matches(p, identity) for p in patterns):
            return role
    return None
