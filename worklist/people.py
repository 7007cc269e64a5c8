"""How people are named on screens and in documents: the display name, never the login
(the login only when no name was recorded)."""

from __future__ import annotations

from typing import Any

__all__ = ["person_label", "person_name"]

_LEVEL_ZH = {"resident": "住院医师", "attending": "主治医师", "chief": "主任医师"}


def person_name(user: Any) -> str:
    """The user's display name, else the login name ('' for no user)."""
    if user is None:
        return ""
    return str(getattr(user, "display_name", None) or getattr(user, "username", "") or "")


def person_label(user: Any) -> str:
    """The display name with the reader level when there is one: ``王医生 主治医师``."""
    name = person_name(user)
    level = getattr(user, "level", None)
    value = getattr(level, "value", level)
    return f"{name} {_LEVEL_ZH[value]}" if name and value in _LEVEL_ZH else name
