"""Which projects claim a series: a pure function of its first instance and where it came from.

A project claims a study when the study is in its coupling list, or when all the criteria its
``routing`` section gives hold for one series (AE titles, sender address, the ``match`` rule).
:meth:`Router.explain` says why, criterion by criterion, for ``fiona explain``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from engine.config.model import ProjectConfig
from engine.route.config import MATCH_RULE, Routing, routing_of
from engine.rules import RuleInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesFacts:
    """What routing sees of one series: an instance's header and the association it came on.

    ``dataset`` is read with ``stop_before_pixels``; ``num_files`` is the series' instance count
    so far.
    """

    study_uid: str
    accession_number: str
    dataset: Dataset
    calling_ae: str
    called_ae: str
    peer_ip: str
    num_files: int

    def rule_input(self) -> RuleInput:
        summary = {
            "num_files": self.num_files,
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
            "calling_ip": self.peer_ip,
        }
        return RuleInput(self.dataset, summary)


@dataclass(frozen=True)
class RouteMatch:
    """A project claiming a study, with the subject and event a coupling list gives."""

    project: str
    subject: str
    event: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Check:
    """One criterion as evaluated: what it wanted, what it saw, whether it held."""

    criterion: str
    seen: str
    held: bool


def _in_networks(address: str, routing: Routing) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in routing.calling_ip)


class Router:
    """The routing of every enabled project, compiled once."""

    def __init__(self, projects: Sequence[ProjectConfig]) -> None:
        self.routings: dict[str, Routing] = {p.name: routing_of(p) for p in projects if p.enabled}

    def match(self, facts: SeriesFacts) -> list[RouteMatch]:
        """Every project that claims the series' study, in project name order."""
        matches = []
        for name in sorted(self.routings):
            found = self._match_one(name, facts)
            if found is not None:
                matches.append(found)
        return matches

    def _match_one(self, name: str, facts: SeriesFacts) -> RouteMatch | None:
        routing = self.routings[name]
        if routing.coupling is not None:
            routing = self._refresh_coupling(name, routing)
            assert routing.coupling is not None
            coupled = routing.coupling.lookup(facts.accession_number, facts.study_uid)
            if coupled is not None:
                return RouteMatch(name, coupled.subject, coupled.event, ("coupling list",))
        if not routing.has_criteria:
            return None
        checks = self.checks(name, facts, explain=False)
        if all(c.held for c in checks):
            return RouteMatch(name, "", "", tuple(c.criterion for c in checks))
        return None

    def _refresh_coupling(self, name: str, routing: Routing) -> Routing:
        assert routing.coupling is not None
        fresh = routing.coupling.current()
        if fresh is not routing.coupling:
            log.info("project %s: coupling list re-read (%d entries)", name, _size(fresh))
            routing = Routing(
                routing.called_ae, routing.calling_ae, routing.calling_ip, routing.rules, fresh
            )
            self.routings[name] = routing
        return routing

    def checks(self, name: str, facts: SeriesFacts, *, explain: bool = True) -> list[Check]:
        """Each routing criterion of project ``name`` against ``facts``.

        With ``explain`` the values seen are filled in (for the local operator only: they may
        be header values, so they are never logged).
        """
        routing = self.routings[name]

        def seen(value: str) -> str:
            return value if explain else ""

        checks = []
        if routing.called_ae:
            held = facts.called_ae.strip() in routing.called_ae
            checks.append(Check("called AE title", seen(facts.called_ae), held))
        if routing.calling_ae:
            held = facts.calling_ae.strip() in routing.calling_ae
            checks.append(Check("calling AE title", seen(facts.calling_ae), held))
        if routing.calling_ip:
            held = _in_networks(facts.peer_ip, routing)
            checks.append(Check("calling IP", seen(facts.peer_ip), held))
        if routing.rules is not None:
            inp = facts.rule_input()
            held = routing.rules.matches(MATCH_RULE, inp)
            detail = ""
            if explain:
                traces = [t for t in routing.rules.explain(inp) if t.name == MATCH_RULE]
                detail = "\n".join(line for t in traces for line in t.lines())
            checks.append(Check(f"rule '{MATCH_RULE}'", detail, held))
        return checks


def _size(coupling: object) -> int:
    by_uid = getattr(coupling, "by_study_uid", {})
    by_acc = getattr(coupling, "by_accession", {})
    return len(by_uid) + len(by_acc)
