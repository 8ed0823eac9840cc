"""Who is calling and what they may do: roles and the principal behind a request.

Roles are ordered: a viewer reads, an operator also acts on devices, commands, models and
deployments, an admin also manages users, tokens, integrations, webhooks and signing keys.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

__all__ = ["Principal", "PrincipalKind", "Role", "parse_tag"]

PrincipalKind = Literal["user", "token", "oidc", "cli", "device", "system"]


class Role(StrEnum):
    """An operator's role; each grants everything the roles below it do."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Higher grants more."""
        return _RANKS[self]

    def grants(self, needed: Role) -> bool:
        """True when this role may do what ``needed`` may."""
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def parse_tag(text: str) -> tuple[str, str]:
    """``"site=lab"`` as ``("site", "lab")``; a ValueError naming the expected form otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"tag {text!r} must look like key=value, e.g. site=lab")
    return key, value


@dataclass(frozen=True)
class Principal:
    """The caller of one request (or a CLI action): identity, role, reach, origin."""

    name: str  # "alice", "token:ci-bot", "oidc:bob@example.org", "cli:root"
    kind: PrincipalKind
    role: Role
    # A tag-scoped API token only sees and acts on devices carrying this tag.
    tag: tuple[str, str] | None = None
    address: str | None = None  # the client address the request came from
    session_id: str | None = None  # the login session of a user's access token

    def allows(self, needed: Role) -> bool:
        """True when this principal's role covers ``needed``."""
        return self.role.grants(needed)

    def sees(self, device_tags: dict[str, str]) -> bool:
        """True when a device with ``device_tags`` is within this principal's reach."""
        if self.tag is None:
            return True
        key, value = self.tag
        return device_tags.get(key) == value

    @classmethod
    def cli(cls) -> Principal:
        """Whoever runs ``edgefleet`` on the control-plane host: it can read the CA key anyway."""
        return cls(name=f"cli:{_login_name()}", kind="cli", role=Role.ADMIN, address="local")


def _login_name() -> str:
    # getuser() fails in containers whose uid has no passwd entry; the uid still names them.
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"
