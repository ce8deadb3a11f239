"""Roles: viewer < operator < admin, granted by ``[access]``."""

from __future__ import annotations

import functools
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
    # Asked for every message: the answer is kept for the identity and these very lists.
    return _role_for(identity, tuple(access.admins), tuple(access.operators), tuple(access.viewers))


@functools.lru_cache(maxsize=4096)
def _role_for(
    identity: str, admins: tuple[str, ...], operators: tuple[str, ...], viewers: tuple[str, ...]
) -> Role | None:
    for role, patterns in (
        (Role.ADMIN, admins),
        (Role.OPERATOR, operators),
        (Role.VIEWER, viewers),
    ):
        if any(identity_matches(p, identity) for p in patterns):
            return role
    return None
