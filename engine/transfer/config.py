"""Check a project's ``destinations`` section, and build its destinations.

The project schema checks the shared keys (``type``, ``description``, ``concurrency``,
``retry``); each type's own options are checked against
``schemas/destinations/<type>.schema.json`` (the shared keys left out), then by the type's
:meth:`~engine.transfer.base.Destination.check`. Every ``send`` step must name destinations
that exist. Issues carry ``file:line path: message`` like every other config problem.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.config.files import ParsedFile, key_line
from engine.config.issues import ConfigError, ConfigIssue, close_match, format_path, issue_order
from engine.config.model import ProjectConfig
from engine.config.schema import (
    apply_defaults,
    load_schema,
    locate_issues,
    schema_dir,
    schema_issues,
)
from engine.config.sections import ProjectSection
from engine.transfer import DESTINATIONS
from engine.transfer.base import Destination, JsonPath
from engine.transfer.outbox import RetryPolicy
from engine.transfer.worker import DestinationEntry

__all__ = [
    "SECTION",
    "build_destinations",
    "check_destinations",
    "destination_options",
    "destinations_of",
    "send_targets",
]

log = logging.getLogger(__name__)

#: Keys every destination has, checked by the project schema and used by the outbox.
SHARED_KEYS = ("description", "concurrency", "retry")

LineOf = Callable[[JsonPath], int | None]


def _fragment(kind: str) -> dict[str, Any]:
    return load_schema(kind, schema_dir() / "destinations")


def destination_options(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A valid entry's own options (shared keys left out) with its fragment's defaults."""
    options = {k: copy.deepcopy(v) for k, v in entry.items() if k not in SHARED_KEYS}
    schema = _fragment(str(entry["type"]))
    apply_defaults(schema, options, schema)
    return options


def _destinations(project: ProjectConfig) -> dict[str, Any]:
    found = project.raw.get("destinations", {})
    return dict(found) if isinstance(found, Mapping) else {}


def send_targets(step: Mapping[str, Any]) -> list[str]:
    """The destination names a ``send`` step's ``to`` holds (a name or a list of names)."""
    to = step.get("to", [])
    return [to] if isinstance(to, str) else [str(x) for x in to]


class _Checker:
    def __init__(self, project: ProjectConfig, line_of: LineOf | None) -> None:
        self.file = project.source
        self.line_of = line_of
        self.issues: list[ConfigIssue] = []

    def add(self, path: JsonPath, message: str, line_path: JsonPath | None = None) -> None:
        line = self.line_of(line_path or path) if self.line_of is not None else None
        self.issues.append(ConfigIssue(self.file, line, format_path(path), message))

    def entry(self, name: str, entry: Mapping[str, Any]) -> None:
        where: JsonPath = ("destinations", name)
        kind = str(entry.get("type", ""))
        cls = DESTINATIONS.get(kind)
        if cls is None:
            known = sorted(DESTINATIONS)
            close = close_match(kind, known)
            hint = f" (did you mean '{close}'?)" if close else ""
            self.add(
                (*where, "type"),
                f"unknown destination type '{kind}'{hint}; expected one of {', '.join(known)}",
            )
            return
        own = {k: v for k, v in entry.items() if k not in SHARED_KEYS}
        found = schema_issues(own, _fragment(kind), self.file, self.line_of, where)
        self.issues += found
        if found:
            return
        options = destination_options(entry)
        own_issues = cls.check(options, self.file, where)
        self.issues += locate_issues(own_issues, options, where, self.file, self.line_of)

    def sends(self, project: ProjectConfig, names: set[str]) -> None:
        pipeline = project.raw.get("pipeline", [])
        if not isinstance(pipeline, list):
            return
        converted = False  # a convert step came before: sends carry NIfTI, not DICOM
        for i, item in enumerate(pipeline):
            if isinstance(item, Mapping) and item.get("step") == "convert":
                converted = True
            if not isinstance(item, Mapping) or item.get("step") != "send":
                continue
            if converted:
                self.converted_targets(project, i, item)
            to = item.get("to", [])
            targets = [(("pipeline", i, "to"), to)] if isinstance(to, str) else [
                (("pipeline", i, "to", n), x) for n, x in enumerate(to) if isinstance(x, str)
            ]
            for path, target in targets:
                if target in names:
                    continue
                close = close_match(target, sorted(names))
                hint = (
                    f" (did you mean '{close}'?)"
                    if close
                    else f"; this project defines {', '.join(sorted(names)) or 'none'}"
                )
                self.add(path, f"expected a destination under 'destinations', found '{target}'"
                         + hint)


    def converted_targets(self, project: ProjectConfig, i: int, item: Mapping[str, Any]) -> None:
        """A send after a convert step delivers files: not to a ``dicom`` destination."""
        destinations = _destinations(project)
        for n, target in enumerate(send_targets(item)):
            entry = destinations.get(target)
            if isinstance(entry, Mapping) and entry.get("type") == "dicom":
                path: JsonPath = ("pipeline", i, "to")
                if not isinstance(item.get("to"), str):
                    path = (*path, n)
                message = (
                    f"a send after a convert step delivers NIfTI files, so expected a folder,"
                    f" sftp or zip destination, found dicom destination '{target}'"
                    " (send DICOM before the convert step)"
                )
                self.add(path, message)


def check_destinations(project: ProjectConfig, line_of: LineOf | None = None) -> list[ConfigIssue]:
    """Every problem of the project's destinations and of the names its send steps use."""
    checker = _Checker(project, line_of)
    destinations = _destinations(project)
    for name, entry in destinations.items():
        if isinstance(entry, Mapping):
            checker.entry(str(name), entry)
    checker.sends(project, set(destinations))
    return sorted(checker.issues, key=issue_order)


def build_destinations(project: ProjectConfig) -> dict[tuple[str, str], DestinationEntry]:
    """``(project, name) -> entry`` for each destination; raises
    :class:`~engine.config.loader.ConfigError` when the section does not check."""
    issues = check_destinations(project)
    if issues:
        raise ConfigError(issues)
    built: dict[tuple[str, str], DestinationEntry] = {}
    for name, entry in _destinations(project).items():
        cls: type[Destination] = DESTINATIONS[str(entry["type"])]
        destination = cls(str(name), destination_options(entry), project.source)
        built[(project.name, str(name))] = DestinationEntry(
            destination=destination,
            retry=RetryPolicy.from_mapping(dict(entry.get("retry", {}))),
            concurrency=int(entry.get("concurrency", 1)),
        )
    return built



def destinations_of(
    projects: Sequence[ProjectConfig],
) -> dict[tuple[str, str], DestinationEntry]:
    """The destinations of every project; a project whose destinations cannot be built is
    logged and left out (its transfers wait in the outbox until it is fixed)."""
    built: dict[tuple[str, str], DestinationEntry] = {}
    for project in projects:
        try:
            built.update(build_destinations(project))
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("destinations of project %s disabled: %s", project.name, issue)
        except Exception as exc:
            log.error("destinations of project %s disabled: %s", project.name, exc)
    return built


def destination_warnings(project: ProjectConfig) -> list[ConfigIssue]:
    """``fiona validate``'s warnings: each ``folder`` destination whose ``path`` does not exist
    (not created, not mounted)."""
    found = []
    for name, entry in _destinations(project).items():
        if not isinstance(entry, dict) or entry.get("type") != "folder" or "path" not in entry:
            continue
        root = Path(str(entry["path"])).expanduser()  # relative to the project file's folder
        root = root if root.is_absolute() else project.source.parent / root
        if not root.exists():
            message = (
                f"the folder {root} does not exist (not created, or not mounted);"
                " transfers to it wait and retry until it does"
            )
            keys = ("destinations", str(name), "path")
            line = key_line(project.source, keys)
            message = f"warning: {message}"
            found.append(ConfigIssue(project.source, line, format_path(keys), message))
    return found


def _check_section(project: ProjectConfig, parsed: ParsedFile) -> list[ConfigIssue]:
    return check_destinations(project, parsed.line_of)


#: The ``destinations`` section of a project file, registered by :mod:`engine.projects`.
SECTION = ProjectSection(
    "destinations",
    "destinations/<type>.schema.json",
    _check_section,
    warn=destination_warnings,
)
