"""The one registry of what the layers above add to config: project sections, rule set kinds.

This layer knows the file format (YAML with lines, schemas, messages), not the features. Each
layer that adds config registers here, once, what it adds:

* a :class:`ProjectSection`: a top-level key of a project file (``routing``, ``pipeline``,
  ``destinations``, ``redcap``), the schema fragment(s) that describe it, and its cross-field
  checker, run on every load after the schema check; optionally the checks only
  ``fiona validate`` makes (files on disk, warnings);
* a :class:`RulesetKind`: a folder under ``rulesets/`` (``pixels/``), its schema and its
  checker for ``fiona validate``.

:mod:`engine.projects` registers every one of them when it is imported; the loader's
:func:`~engine.config.loader.check_project_files` and ``fiona validate`` read them here. A
project cannot be checked before anything is registered (:func:`project_sections` raises).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.files import ParsedFile
from engine.config.issues import ConfigIssue
from engine.config.model import ProjectConfig

__all__ = [
    "ProjectSection",
    "RulesetKind",
    "project_sections",
    "register_ruleset_kind",
    "register_section",
    "ruleset_kind",
]

#: A loaded project (schema checked, defaults applied) and its parsed file -> its issues.
SectionCheck = Callable[[ProjectConfig, ParsedFile], list[ConfigIssue]]
#: A loaded, valid project -> issues ``fiona validate`` reports (not checked on load).
ProjectCheck = Callable[[ProjectConfig], list[ConfigIssue]]


@dataclass(frozen=True)
class ProjectSection:
    """What one layer adds to a project file."""

    #: The top-level key of the project file (a property of ``project.schema.json``).
    key: str
    #: The schema fragment(s) that describe it, relative to ``schemas/``
    #: (``steps/<step>.schema.json``); the key's own shape is in ``project.schema.json``.
    schema: str
    #: Cross-field checks the schema cannot express, on every load (rules compile, names
    #: that must exist do): an issue leaves the project out.
    check: SectionCheck
    #: ``fiona validate`` only: problems with files the section names (a token file).
    validate: ProjectCheck | None = None
    #: ``fiona validate`` only: warnings (``warning: ...``), which leave the exit status 0.
    warn: ProjectCheck | None = None


@dataclass(frozen=True)
class RulesetKind:
    """A kind of file under ``rulesets/``, by the folder right under it."""

    #: The folder (``pixels``); ``""``: every folder no other kind claims.
    folder: str
    #: Its schema, relative to ``schemas/``.
    schema: str
    #: Every problem of one file; None: not checked by ``fiona validate``.
    check: Callable[[Path], list[ConfigIssue]] | None


_SECTIONS: dict[str, ProjectSection] = {}
_KINDS: dict[str, RulesetKind] = {}


def register_section(section: ProjectSection) -> None:
    """Add ``section``; registering the same section again changes nothing, a second section
    under one key is an error."""
    known = _SECTIONS.get(section.key)
    if known is not None and known != section:
        raise ValueError(f"project section '{section.key}' is registered twice")
    _SECTIONS[section.key] = section


def register_ruleset_kind(kind: RulesetKind) -> None:
    """Add ``kind``; as :func:`register_section`, by folder."""
    known = _KINDS.get(kind.folder)
    if known is not None and known != kind:
        raise ValueError(f"rule set kind '{kind.folder}' is registered twice")
    _KINDS[kind.folder] = kind


def project_sections(project_schema: Mapping[str, Any]) -> list[ProjectSection]:
    """The registered sections, in registration order. Raises RuntimeError when none is (the
    checks would be skipped: import :mod:`engine.projects` first) or when one's key is not a
    property of the project schema."""
    if not _SECTIONS:
        raise RuntimeError("no project sections are registered: import engine.projects first")
    properties = project_schema.get("properties", {})
    for key in _SECTIONS:
        if key not in properties:
            raise RuntimeError(f"project section '{key}' is not in project.schema.json")
    return list(_SECTIONS.values())


def ruleset_kind(folder: str) -> RulesetKind:
    """The kind of rule set file in ``rulesets/<folder>/`` (the ``""`` kind for any folder no
    kind claims). Raises RuntimeError when nothing is registered."""
    if "" not in _KINDS:
        raise RuntimeError("no rule set kinds are registered: import engine.projects first")
    return _KINDS.get(folder, _KINDS[""])
