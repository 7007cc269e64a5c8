"""Who is asking, and what they may see: the organisation scope of every query."""

from __future__ import annotations

from dataclasses import dataclass

from rdc_core.errors import PermissionDeniedError
from worklist.models import OrgKind, ReaderLevel, Role

__all__ = ["READING_ROLES", "Principal", "require_roles"]

READING_ROLES = frozenset({Role.READER, Role.SENIOR_READER})


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user as the services see them."""

    user_id: str
    username: str
    role: Role
    org_id: str
    org_kind: OrgKind
    level: ReaderLevel | None = None
    # Tokens carry it; revoking a user's tokens raises the stored one (worklist.accounts).
    token_generation: int = 0
    # The person's name as shown to people (the login where none is set).
    display_name: str = ""

    @property
    def is_clinic_user(self) -> bool:
        """Clinic users only ever see their own organisation's data."""
        return self.org_kind is OrgKind.CLINIC

    @property
    def actor(self) -> str:
        return f"user:{self.username}"


def require_roles(
    principal: Principal, roles: frozenset[Role] | set[Role], *, lead_only: bool = False
) -> None:
    """Raise PermissionDeniedError unless the principal has one of ``roles``."""
    if principal.role not in roles or (lead_only and principal.org_kind is not OrgKind.LEAD):
        raise PermissionDeniedError(f"role {principal.role.value} may not do this")
