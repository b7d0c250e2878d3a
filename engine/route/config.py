"""A project's ``routing`` and ``completeness`` sections as typed objects, and their checks.

The schema (``schemas/project.schema.json``) has checked their shape; this module checks what a
schema cannot (rules compile, networks parse, the coupling list exists and has the right
columns) and builds :class:`Routing` and :class:`Completeness` from a loaded project.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.files import ParsedFile
from engine.config.issues import ConfigError, ConfigIssue, format_path
from engine.config.model import ProjectConfig
from engine.config.sections import ProjectSection
from engine.route.coupling import CouplingError, CouplingList
from engine.rules import RuleSet, Source, compile_rules

JsonPath = tuple[str | int, ...]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: The rule of ``routing.rules`` that decides; the others are its helpers.
MATCH_RULE = "match"


@dataclass(frozen=True)
class Routing:
    """Which studies a project claims (see the schema's ``routing`` for the semantics).

    AE titles are compared after trimming spaces; ``calling_ip`` holds networks (a single
    address is a /32 or /128).
    """

    called_ae: frozenset[str]
    calling_ae: frozenset[str]
    calling_ip: tuple[IpNetwork, ...]
    rules: RuleSet | None
    coupling: CouplingList | None

    @property
    def has_criteria(self) -> bool:
        """Whether anything but the coupling list can claim a study."""
        return bool(self.called_ae or self.calling_ae or self.calling_ip or self.rules)


@dataclass(frozen=True)
class Completeness:
    """When a study is complete for a project; all durations in seconds. ``mpps_wait``: how
    long after its MPPS step completed a study waits for the instances the step references
    (0: MPPS is not used)."""

    study_quiet: float
    series_quiet: float
    expected_labels: frozenset[str]
    force_complete: float
    mpps_wait: float = 600.0


def _section(project: ProjectConfig, key: str) -> dict[str, Any]:
    value = project.raw.get(key, {})
    return value if isinstance(value, dict) else {}


def _networks(values: list[str]) -> tuple[IpNetwork, ...]:
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values)


def _coupling_path(project: ProjectConfig, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else project.source.parent / path


def _rules(project: ProjectConfig, lines: Mapping[JsonPath, int]) -> RuleSet | None:
    rules = _section(project, "routing").get("rules") or {}
    if not rules:
        return None
    ruleset = compile_rules(rules, Source(project.source, ("routing", "rules"), lines))
    if MATCH_RULE not in ruleset.names:
        where = Source(project.source, ("routing", "rules"), lines)
        raise ConfigError([where.issue((), "expected a rule named 'match' (the one that decides)")])
    return ruleset


def check_routing(project: ProjectConfig, lines: Mapping[JsonPath, int]) -> list[ConfigIssue]:
    """Every problem of the project's routing section beyond its schema."""
    issues: list[ConfigIssue] = []
    routing = _section(project, "routing")

    def issue(path: JsonPath, message: str) -> ConfigIssue:
        line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), None)
        return ConfigIssue(project.source, line, format_path(path), message)

    for n, value in enumerate(routing.get("calling_ip", [])):
        try:
            ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            found = "a text that is neither" if value.strip() else "an empty text"
            issues.append(
                issue(
                    ("routing", "calling_ip", n),
                    f"expected an IP address or a CIDR network such as 10.20.0.0/16, {found}",
                )
            )
    try:
        _rules(project, lines)
    except ConfigError as exc:
        issues += exc.issues
    coupling = routing.get("coupling_list")
    if coupling:
        try:
            CouplingList.load(_coupling_path(project, coupling))
        except CouplingError as exc:
            issues.append(issue(("routing", "coupling_list"), str(exc)))
    return issues


def routing_of(project: ProjectConfig) -> Routing:
    """The checked routing of a loaded project (the loader has already run the checks)."""
    routing = _section(project, "routing")
    coupling = routing.get("coupling_list")
    return Routing(
        called_ae=frozenset(a.strip() for a in routing.get("called_ae", [])),
        calling_ae=frozenset(a.strip() for a in routing.get("calling_ae", [])),
        calling_ip=_networks(routing.get("calling_ip", [])),
        rules=_rules(project, {}),
        coupling=CouplingList.load(_coupling_path(project, coupling)) if coupling else None,
    )


def completeness_of(project: ProjectConfig) -> Completeness:
    section = _section(project, "completeness")
    return Completeness(
        study_quiet=float(section.get("study_quiet_seconds", 300)),
        series_quiet=float(section.get("series_quiet_seconds", 16)),
        expected_labels=frozenset(section.get("expected_labels", [])),
        force_complete=float(section.get("force_complete_seconds", 86400)),
        mpps_wait=float(section.get("mpps_wait_seconds", 600)),
    )


def _check_section(project: ProjectConfig, parsed: ParsedFile) -> list[ConfigIssue]:
    return check_routing(project, parsed.lines)


#: The ``routing`` section (``completeness`` has no checks beyond its schema), registered by
#: :mod:`engine.projects`.
SECTION = ProjectSection("routing", "ruleset.schema.json#/$defs/rules", _check_section)
