"""What the commands on the site's store share: the site config, the existing index.

Every command finds the site config the same way (``--config``, ``$FIONA_CONFIG``,
``/etc/fiona/site.yaml``, the embedded defaults) and applies the same command-line overrides;
a command that reads or changes the index opens the existing, current one and never creates or
upgrades it (``fiona serve`` and ``fiona db upgrade`` do).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from engine.config.issues import ConfigError
from engine.config.loader import find_site_config, load_site
from engine.config.model import SiteConfig
from engine.store.db import IndexUnavailable
from engine.store.index import IndexUnreachable, IndexUnusable, SqliteIndex, open_index

__all__ = ["load_site_or_exit", "run_with_index", "site_overrides"]


def site_overrides(args: argparse.Namespace) -> dict[str, object]:
    """CLI flags that override the site config (validated with it)."""
    mapping = {
        "port": "port",
        "ae_title": "ae_title",
        "data": "data_dir",
        "projects": "projects_dir",
        "bind": "bind_address",
    }
    out: dict[str, object] = {}
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = str(value) if isinstance(value, Path) else value
    web_port = getattr(args, "web_port", None)
    if web_port is not None:  # 0: no web portal; else its port (the rest of `web` as configured)
        out["web.enabled"] = web_port != 0
        if web_port:
            out["web.port"] = web_port
    return out


def run_with_index(
    args: argparse.Namespace,
    command: Callable[[SiteConfig, SqliteIndex], int],
    *,
    read_only: bool = False,
    unreachable: Callable[[SiteConfig, str], int] | None = None,
) -> int:
    """For commands on the site's index: load the site config, open the existing, current
    index (read-only when ``read_only``), run ``command`` on both, close the index.

    Exit status 2, with one message, when the config is invalid or the index is missing,
    older or newer than the code: such commands never create or upgrade an index. An index
    database that does not take a connection is the same, or with ``unreachable``, what it
    returns (given the site and why).
    """
    site = load_site_or_exit(args)
    if site is None:
        return 2
    try:
        index = open_index(
            site.index_url, site.data_dir / "index.sqlite", upgrade=False, read_only=read_only
        )
    except (IndexUnreachable, IndexUnavailable) as exc:
        if unreachable is None:
            print(f"fiona: {exc}", file=sys.stderr)
            return 2
        return unreachable(site, str(exc).removeprefix("cannot open the index ").strip())
    except IndexUnusable as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 2
    try:
        return command(site, index)
    finally:
        index.close()


def load_site_or_exit(args: argparse.Namespace) -> SiteConfig | None:
    """The site config with CLI overrides, or None after printing every problem."""
    try:
        return load_site(find_site_config(getattr(args, "config", None)), site_overrides(args))
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"error: {issue}", file=sys.stderr)
        print("fiona: the site config is invalid; not starting", file=sys.stderr)
        return None
