"""``fiona explain``: the command around :func:`engine.route.explain.explain_targets`."""

from __future__ import annotations

import argparse

from engine.projects import load_enabled_projects
from engine.route.explain import explain_targets
from engine.store.commands import load_site_or_exit

__all__ = ["run_explain"]


def run_explain(args: argparse.Namespace) -> int:
    site = load_site_or_exit(args)
    if site is None:
        return 2
    return explain_targets(args, site, load_enabled_projects)
