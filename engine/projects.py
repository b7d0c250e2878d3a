"""Every feature's project config, registered once; and the site's enabled projects.

:mod:`engine.config` reads project files, checks them against ``project.schema.json`` and
formats problems; it knows nothing of the layers above it. What each layer adds to a project
file, it declares next to its code (a ``SECTION``, a ``*_KIND``), and this module registers all
of them in :mod:`engine.config.sections`, in the order their checks run. A new section is one
line in :data:`PROJECT_SECTIONS`; a new kind of rule set file one line in :data:`RULESET_KINDS`.

Importing this module is what makes projects checkable: the commands that load projects
(``fiona serve``, ``validate``, ``ingest``, ``explain``, ``status``) import it, and so does the
test suite's ``conftest.py``.
"""

from __future__ import annotations

import logging

from engine.config.loader import load_projects  # here with every section registered
from engine.config.model import ProjectConfig, SiteConfig
from engine.config.sections import (
    ProjectSection,
    RulesetKind,
    register_ruleset_kind,
    register_section,
)
from engine.deid.pixels import PIXELS_KIND
from engine.deid.profile import PROFILE_KIND
from engine.pipeline.bids import BIDS_KIND
from engine.pipeline.validate import SECTION as PIPELINE
from engine.redcap.settings import SECTION as REDCAP
from engine.route.config import SECTION as ROUTING
from engine.rules.loader import RULESET_KIND
from engine.transfer.config import SECTION as DESTINATIONS

__all__ = ["PROJECT_SECTIONS", "RULESET_KINDS", "load_enabled_projects", "load_projects"]

log = logging.getLogger("fiona")

#: The sections of a project file other layers own, in the order their checks run.
PROJECT_SECTIONS: tuple[ProjectSection, ...] = (ROUTING, PIPELINE, DESTINATIONS, REDCAP)
#: Kinds of rule set files, by the folder under ``rulesets/`` ("": any other folder).
RULESET_KINDS: tuple[RulesetKind, ...] = (PIXELS_KIND, PROFILE_KIND, BIDS_KIND, RULESET_KIND)

for _section in PROJECT_SECTIONS:
    register_section(_section)
for _kind in RULESET_KINDS:
    register_ruleset_kind(_kind)


def load_enabled_projects(site: SiteConfig) -> list[ProjectConfig]:
    """Valid, enabled projects; each invalid one is logged with its reasons and left out."""
    projects, issues = load_projects(site.projects_dir)
    for issue in issues:
        log.error("project disabled: %s", issue)
    enabled = [p for p in projects if p.enabled]
    log.info("projects: %s", ", ".join(p.name for p in enabled) or "(none)")
    return enabled
