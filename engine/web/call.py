"""One API call as a route's handler sees it (:class:`Call`), and one route of the table
(:class:`Route`); the route table itself is :data:`engine.web.api.ROUTES`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import QueryParams

from engine.config.model import ProjectConfig, SiteConfig
from engine.store.index import Index
from engine.store.users import User
from engine.web.auth import ApiError, Need

__all__ = ["Call", "Route"]


@dataclass
class Call:
    """One authenticated request, parsed: who, the path and query parameters, an upload."""

    user: User
    site: SiteConfig
    index: Index
    projects: Callable[[SiteConfig], list[ProjectConfig]]
    params: dict[str, str] = field(default_factory=dict)
    query: QueryParams = field(default_factory=QueryParams)
    upload: bytes | None = None
    body: dict[str, str] = field(default_factory=dict)

    @property
    def who(self) -> str:
        """The operator an audit entry names: the web user."""
        return f"web:{self.user.name}"

    def visible(self) -> Sequence[str] | None:
        """The projects the user is limited to (None: all)."""
        return None if self.user.sees_all else self.user.projects

    def int_query(self, name: str, default: int, most: int) -> int:
        raw = self.query.get(name)
        if raw is None:
            return default
        if not raw.isdigit():
            raise ApiError(400, f"{name} must be a whole number", f"give e.g. {name}={default}")
        return min(int(raw), most)


@dataclass(frozen=True)
class Route:
    """One API route: ``GET``/``POST``, its path under ``/api/v1``, who may call it, what it
    does (its OpenAPI summary), and its handler."""

    method: str
    path: str
    need: Need
    summary: str
    handler: Callable[[Call], Any]
    query: tuple[str, ...] = ()
    upload: bool = False
    body: tuple[str, ...] = ()  # the fields (strings) of its JSON body
