"""Routing: which projects claim a study, table-driven, and the checks of routing sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset

from engine.config.loader import check_project_files, load_project
from engine.route.coupling import CouplingList
from engine.route.router import Router, SeriesFacts
from tests import synth


def _project(folder: Path, name: str, routing: dict[str, Any]) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "routing": routing}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def instance() -> Dataset:
    spec = synth.make_study_spec(5, study_description="SYNTH BRAIN MRI", accession_number="ACC5")
    return synth.make_study(spec, [synth.MR_SERIES["t1_mprage"]], size=8)[0]


def _facts(
    ds: Dataset, calling: str = "MR1", called: str = "FIONA", ip: str = "10.1.2.3"
) -> SeriesFacts:
    return SeriesFacts(
        str(ds.StudyInstanceUID), str(ds.AccessionNumber), ds, calling, called, ip, 16
    )


BRAIN_RULE = {"match": {"conditions": [{"attr": "StudyDescription", "value": "(?i)brain"}]}}
KNEE_RULE = {"match": {"conditions": [{"attr": "StudyDescription", "value": "(?i)knee"}]}}

CASES: list[tuple[str, dict[str, Any], dict[str, str], bool]] = [
    ("calling AE listed", {"calling_ae": ["MR1", "MR2"]}, {}, True),
    ("calling AE not listed", {"calling_ae": ["MR2"]}, {}, False),
    ("called AE listed", {"called_ae": ["FIONA"]}, {}, True),
    ("called AE padded by the sender", {"called_ae": ["FIONA"]}, {"called": "FIONA "}, True),
    ("calling IP in network", {"calling_ip": ["10.1.0.0/16"]}, {}, True),
    ("calling IP single address", {"calling_ip": ["10.1.2.3"]}, {}, True),
    ("calling IP outside", {"calling_ip": ["10.2.0.0/16"]}, {}, False),
    ("header rule holds", {"rules": BRAIN_RULE}, {}, True),
    ("header rule fails", {"rules": KNEE_RULE}, {}, False),
    ("all criteria hold", {"calling_ae": ["MR1"], "rules": BRAIN_RULE}, {}, True),
    ("one criterion fails", {"calling_ae": ["MR1"], "rules": KNEE_RULE}, {}, False),
    ("no criteria claims nothing", {}, {}, False),
    (
        "rule on the series summary",
        {
            "rules": {
                "match": {
                    "conditions": [{"attr": "summary.calling_ae", "op": "==", "value": "MR1"}]
                }
            }
        },
        {},
        True,
    ),
]


@pytest.mark.parametrize(("case", "routing", "origin", "claims"), CASES, ids=[c[0] for c in CASES])
def test_routing_criteria(
    tmp_path: Path,
    instance: Dataset,
    case: str,
    routing: dict[str, Any],
    origin: dict[str, str],
    claims: bool,
) -> None:
    project = load_project(_project(tmp_path, "p1", routing))
    matches = Router([project]).match(_facts(instance, **origin))
    assert [m.project for m in matches] == (["p1"] if claims else [])


def test_coupling_list_claims_with_subject_and_event(tmp_path: Path, instance: Dataset) -> None:
    (tmp_path / "couple.csv").write_text(
        "AccessionNumber,subject,event\nACC5,sub-007,baseline\nACC6,sub-008,baseline\n"
    )
    project = load_project(_project(tmp_path, "p1", {"coupling_list": "couple.csv"}))
    [match] = Router([project]).match(_facts(instance))
    assert (match.project, match.subject, match.event) == ("p1", "sub-007", "baseline")


def test_coupling_list_is_reread_when_it_changes(tmp_path: Path, instance: Dataset) -> None:
    csv = tmp_path / "couple.csv"
    csv.write_text("StudyInstanceUID,subject\n1.2.3,sub-1\n")
    router = Router([load_project(_project(tmp_path, "p1", {"coupling_list": "couple.csv"}))])
    assert router.match(_facts(instance)) == []
    csv.write_text(f"StudyInstanceUID,subject\n{instance.StudyInstanceUID},sub-2\n")
    import os

    os.utime(csv, ns=(10**18, 10**18))  # a different mtime, whatever the clock's resolution
    assert [m.subject for m in router.match(_facts(instance))] == ["sub-2"]


def test_several_projects_claim_in_name_order(tmp_path: Path, instance: Dataset) -> None:
    projects = [
        load_project(_project(tmp_path, "zeta", {"calling_ae": ["MR1"]})),
        load_project(_project(tmp_path, "alpha", {"rules": BRAIN_RULE})),
        load_project(_project(tmp_path, "knee", {"rules": KNEE_RULE})),
    ]
    assert [m.project for m in Router(projects).match(_facts(instance))] == ["alpha", "zeta"]


def test_explain_checks_show_what_was_seen(tmp_path: Path, instance: Dataset) -> None:
    project = load_project(_project(tmp_path, "p1", {"calling_ae": ["MR2"], "rules": BRAIN_RULE}))
    checks = Router([project]).checks("p1", _facts(instance))
    assert [(c.criterion, c.held) for c in checks] == [
        ("calling AE title", False),
        ("rule 'match'", True),
    ]
    assert checks[0].seen == "MR1"
    assert "StudyDescription" in checks[1].seen


BROKEN: list[tuple[dict[str, Any], str]] = [
    (
        {"calling_ip": ["10.0.0.0/33"]},
        "routing.calling_ip[0]: expected an IP address or a CIDR network such as 10.20.0.0/16,"
        " a text that is neither",
    ),
    (
        {"rules": {"helper": {"conditions": [{"attr": "Modality", "value": "MR"}]}}},
        "routing.rules: expected a rule named 'match'",
    ),
    ({"coupling_list": "missing.csv"}, "routing.coupling_list: coupling list"),
    ({"calling_ae": ["A\\B"]}, "routing.calling_ae[0]: expected an AE title"),
]


@pytest.mark.parametrize(("routing", "message"), BROKEN)
def test_broken_routing_is_reported(tmp_path: Path, routing: dict[str, Any], message: str) -> None:
    path = _project(tmp_path, "p1", routing)
    projects, issues = check_project_files([path])
    assert projects == []
    assert any(message in str(issue) for issue in issues), [str(i) for i in issues]
    assert all(str(issue).startswith(f"{path}:") for issue in issues)


def test_coupling_list_needs_a_key_column(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("PatientID,subject\nX,1\n")
    _, issues = check_project_files([_project(tmp_path, "p1", {"coupling_list": "bad.csv"})])
    [issue] = issues
    assert "expected a header row with AccessionNumber and/or StudyInstanceUID" in str(issue)
    assert "PatientID" in str(issue)  # a column name, not a cell value


def test_coupling_lookup_prefers_study_uid(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("AccessionNumber,StudyInstanceUID,subject\nA1,,by-accession\n,1.2.3,by-uid\n")
    coupling = CouplingList.load(path)
    assert coupling.lookup("A1", "1.2.3") is not None
    assert coupling.lookup("A1", "1.2.3").subject == "by-uid"  # type: ignore[union-attr]
    assert coupling.lookup("A1", "9.9").subject == "by-accession"  # type: ignore[union-attr]
    assert coupling.lookup("", "9.9") is None


def test_explain_prints_claims_labels_and_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    projects = tmp_path / "projects"
    projects.mkdir()
    doc = {
        "name": "neuro",
        "routing": {"calling_ae": ["MR1"], "rules": BRAIN_RULE},
        "pipeline": [{"step": "classify"}, {"step": "copy", "to": "export/neuro"}],
    }
    (projects / "neuro.yaml").write_text(yaml.safe_dump(doc))
    (projects / "knee.yaml").write_text(
        yaml.safe_dump({"name": "knee", "routing": {"rules": KNEE_RULE}})
    )
    spec = synth.make_study_spec(5, study_description="SYNTH BRAIN MRI")
    files = synth.write_study(
        synth.make_study(spec, [synth.MR_SERIES["t1_mprage"]], size=8), tmp_path / "study"
    )
    code = main(
        ["explain", "--projects", str(projects), "--data", str(tmp_path / "data"),
         "--calling-ae", "MR1", str(files[0].parent)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "labels: " in out and "t1" in out.split("labels: ")[1].splitlines()[0]
    assert "claimed by neuro (calling AE title, rule 'match')" in out
    assert "steps: classify -> copy" in out
    assert "claimed by knee" not in out
    assert not (tmp_path / "data" / "export").exists()  # a dry run writes nothing


def test_explain_says_when_no_project_claims(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    projects = tmp_path / "projects"
    projects.mkdir()
    (projects / "knee.yaml").write_text(
        yaml.safe_dump({"name": "knee", "routing": {"rules": KNEE_RULE}})
    )
    spec = synth.make_study_spec(5, study_description="SYNTH BRAIN MRI")
    files = synth.write_study(
        synth.make_study(spec, [synth.MR_SERIES["flair"]], size=8), tmp_path / "study"
    )
    assert main(["explain", "--projects", str(projects), str(files[0])]) == 0
    out = capsys.readouterr().out
    assert "no project claims this study" in out
    assert "rule 'match': no" in out
