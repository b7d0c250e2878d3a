"""The rule language (engine/rules): operators, attributes, groups, references, validation,
series-level labels, JMESPath, explain, the speed paths, and the default rule sets' golden cases.

Validation messages are pinned in ``tests/rules_cases/expected_messages.txt`` from the
broken-on-purpose files in ``tests/rules_cases/rulesets/broken/`` (each fault commented).
Regenerate with ``FIONA_UPDATE_GOLDEN=1 pytest tests/test_rules.py`` and review by eye.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset

from engine.cli import main as cli_main
from engine.config.loader import ConfigError, LineLoader
from engine.config.validate import run_validate
from engine.dicom.dataset import read_header_dataset
from engine.rules import (
    OPERATORS,
    RuleInput,
    RuleSet,
    RuleSetGroup,
    SeriesLabels,
    Source,
    check_ruleset,
    compile_rules,
    load_ruleset,
    load_rulesets,
    ruleset_files,
)
from engine.rules.attributes import parse_attr
from engine.rules.compiler import CONDITION_KEYS
from engine.rules.testing import CaseError, check_cases, load_case, run_test_rules
from tests.synth import CT_SERIES, MR_SERIES, make_study, make_study_spec

REPO = Path(__file__).resolve().parents[1]
CLASSIFY = REPO / "rulesets" / "classify"
CASES = Path("tests/rules_cases")  # relative: tests chdir to REPO
BROKEN = CASES / "rulesets" / "broken"
GOLDEN = REPO / CASES / "expected_messages.txt"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def dataset(**values: Any) -> Dataset:
    """A dataset from keywords; ``private`` = [(tag, VR, value)] adds private elements."""
    ds = Dataset()
    for tag, vr, value in values.pop("private", []):
        ds.add_new(tag, vr, value)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def reread(ds: Dataset, implicit: bool = False) -> Dataset:
    """``ds`` written as Part 10 bytes and read back raw, as the engine reads archived files."""
    buffer = io.BytesIO()
    copy = Dataset(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy.save_as(buffer, implicit_vr=implicit, little_endian=True)
    return dcmread(io.BytesIO(buffer.getvalue()), stop_before_pixels=True, force=True)


def rules(data: dict[str, Any]) -> RuleSet:
    return compile_rules(data, Path("(test)"))


def holds(condition: dict[str, Any], ds: Dataset, summary: dict[str, Any] | None = None) -> bool:
    """Whether one condition holds, asked through the fast path and through explain."""
    ruleset = rules({"r": {"conditions": [condition]}})
    fast = ruleset.matches("r", RuleInput(ds, summary))
    (trace,) = ruleset.explain(RuleInput(ds, summary))
    assert trace.result == fast, "explain disagrees with the fast path"
    return fast


# --------------------------------------------------------------------------- operators

MR = dataset(
    Modality="MR",
    SeriesDescription="t1_mprage_sag ",
    ImageType=["ORIGINAL", "PRIMARY", "M", "ND"],
    EchoTime="2.98",
    SeriesNumber="5",
    Rows=64,
    EchoNumbers=[1, 2],
    StudyDate="20230615",
    PatientID="0012345",
    ScanOptions="",
    private=[(0x00190010, "LO", "ACME 1.0"), (0x00191001, "LO", "n/a")],
)


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        # regexp: re.search of the text; multi-valued: values joined with a backslash
        ({"attr": "SeriesDescription", "value": "mprage"}, True),
        ({"attr": "SeriesDescription", "value": "^t1_mprage_sag$"}, True),  # padding removed
        ({"attr": "SeriesDescription", "value": "MPRAGE"}, False),  # case-sensitive
        ({"attr": "SeriesDescription", "value": "(?i)MPRAGE"}, True),
        ({"attr": "ImageType", "value": r"^ORIGINAL\\PRIMARY\\"}, True),
        ({"attr": "ImageType", "value": "^M$"}, False),  # the joined text is not just 'M'
        ({"attr": "ImageType[*]", "value": "^M$"}, True),  # any single value
        ({"attr": "ImageType[2]", "value": "^M$"}, True),
        ({"attr": "EchoTime", "value": r"^2\.98$"}, True),  # DS is text as written
        ({"attr": "ProtocolName", "value": ".*"}, False),  # missing
        ({"attr": "ProtocolName", "value": ".*", "negate": True}, True),  # negate after
        # contains: membership for multi-valued, substring for single-valued
        ({"attr": "ImageType", "op": "contains", "value": "ND"}, True),
        ({"attr": "ImageType", "op": "contains", "value": "PRIM"}, False),
        ({"attr": "SeriesDescription", "op": "contains", "value": "mprage"}, True),
        ({"attr": "EchoNumbers", "op": "contains", "value": 2}, True),
        ({"attr": "EchoNumbers", "op": "contains", "value": 3}, False),
        ({"attr": "ProtocolName", "op": "contains", "value": "x"}, False),
        # ==: exact text, or numeric for a number operand (DS/IS text parsed)
        ({"attr": "Modality", "op": "==", "value": "MR"}, True),
        ({"attr": "Modality", "op": "==", "value": "mr"}, False),
        ({"attr": "SeriesDescription", "op": "==", "value": "t1_mprage_sag"}, True),
        ({"attr": "EchoTime", "op": "==", "value": 2.98}, True),
        ({"attr": "SeriesNumber", "op": "==", "value": 5}, True),
        ({"attr": "SeriesNumber", "op": "==", "value": "5"}, True),
        ({"attr": "Rows", "op": "==", "value": 64}, True),  # US, a binary number
        ({"attr": "ImageType", "op": "==", "value": "ORIGINAL\\PRIMARY\\M\\ND"}, True),
        ({"attr": "ScanOptions", "op": "==", "value": ""}, True),  # present but empty
        ({"attr": "ProtocolName", "op": "==", "value": ""}, False),  # missing is not empty
        ({"attr": "Modality", "op": "==", "value": "CT", "negate": True}, True),
        # !=: comparable and different; a missing attribute fails it too
        ({"attr": "Modality", "op": "!=", "value": "CT"}, True),
        ({"attr": "Modality", "op": "!=", "value": "MR"}, False),
        ({"attr": "ProtocolName", "op": "!=", "value": "x"}, False),
        ({"attr": "ProtocolName", "op": "!=", "value": "x", "negate": True}, True),
        ({"attr": "(0019,1001)", "op": "!=", "value": 3}, False),  # 'n/a' is not a number
        ({"attr": "(0019,1001)", "op": "<", "value": 3}, False),
        # <, >: numbers; several values without an index are not one number
        ({"attr": "EchoTime", "op": "<", "value": 3}, True),
        ({"attr": "EchoTime", "op": ">", "value": 3}, False),
        ({"attr": "Rows", "op": ">", "value": 32}, True),
        ({"attr": "StudyDate", "op": ">", "value": 20230101}, True),  # DA read as a number
        ({"attr": "EchoNumbers", "op": ">", "value": 0}, False),
        ({"attr": "EchoNumbers[1]", "op": ">", "value": 1}, True),
        ({"attr": "EchoNumbers[*]", "op": ">", "value": 1}, True),
        ({"attr": "InversionTime", "op": "<", "value": 1e9}, False),  # missing
        # approx: absolute tolerance, default 0.001
        ({"attr": "EchoTime", "op": "approx", "value": 2.9805}, True),
        ({"attr": "EchoTime", "op": "approx", "value": 3.0}, False),
        ({"attr": "EchoTime", "op": "approx", "value": 3.0, "tolerance": 0.05}, True),
        # exists / not_exists: presence only (an empty element is present)
        ({"attr": "ScanOptions", "op": "exists"}, True),
        ({"attr": "ProtocolName", "op": "exists"}, False),
        ({"attr": "ProtocolName", "op": "not_exists"}, True),
        ({"attr": "Modality", "op": "not_exists"}, False),
        ({"attr": "Modality", "op": "exists", "negate": True}, False),
        ({"attr": "ImageType[3]", "op": "exists"}, True),
        ({"attr": "ImageType[4]", "op": "exists"}, False),  # past the end: missing
        # in: equal (as ==) to one of the list
        ({"attr": "Modality", "op": "in", "value": ["CT", "MR"]}, True),
        ({"attr": "Modality", "op": "in", "value": ["CT", "PT"]}, False),
        ({"attr": "EchoTime", "op": "in", "value": [1, 2.98]}, True),
        ({"attr": "PatientID", "op": "in", "value": ["12345"]}, False),  # text: leading zero
        ({"attr": "PatientID", "op": "in", "value": ["0012345"]}, True),
    ],
)
def test_operator(condition: dict[str, Any], expected: bool) -> None:
    assert holds(condition, MR) is expected


def test_every_operator_is_tested_above() -> None:
    source = Path(__file__).read_text(encoding="utf-8")
    for name in OPERATORS:
        assert f'"op": "{name}"' in source or name == "regexp", name


# --------------------------------------------------------------------------- attributes

PET = dataset(
    Modality="PT",
    ReferencedImageSequence=[
        dataset(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2"),
        dataset(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.128"),
    ],
    RadiopharmaceuticalInformationSequence=[
        dataset(
            Radiopharmaceutical="Fluorodeoxyglucose",
            RadiopharmaceuticalCodeSequence=[dataset(CodeValue="C-B1031")],
        )
    ],
    private=[(0x00190010, "LO", "SIEMENS MR HEADER"), (0x0019100C, "IS", "1000")],
)


@pytest.mark.parametrize(
    ("attr", "op", "value", "expected"),
    [
        ("(0008,0060)", "==", "PT", True),
        ("(0008, 0060)", "==", "PT", True),
        ("0x00080060", "==", "PT", True),
        ("0X00080060", "==", "PT", True),
        ("ReferencedImageSequence", "exists", None, True),
        ("ReferencedImageSequence[1]", "exists", None, True),
        ("ReferencedImageSequence[2]", "exists", None, False),
        (
            "ReferencedImageSequence[0].ReferencedSOPClassUID",
            "==",
            "1.2.840.10008.5.1.4.1.1.2",
            True,
        ),
        ("ReferencedImageSequence[0].ReferencedSOPClassUID", "value", "128$", False),
        ("ReferencedImageSequence[*].ReferencedSOPClassUID", "value", "128$", True),
        ("ReferencedImageSequence[*].ReferencedSOPInstanceUID", "exists", None, False),
        (
            "RadiopharmaceuticalInformationSequence[*].RadiopharmaceuticalCodeSequence[0].CodeValue",
            "==",
            "C-B1031",
            True,
        ),
        ("(0019,100C)", ">", 500, True),  # private, by tag only
        ("(0019,0010)", "==", "SIEMENS MR HEADER", True),
        ("(0029,1010)", "exists", None, False),
    ],
)
def test_attribute_paths(attr: str, op: str, value: Any, expected: bool) -> None:
    condition: dict[str, Any] = {"attr": attr}
    if op != "value":
        condition["op"] = op
    if value is not None:
        condition["value"] = value
    for ds in (PET, reread(PET), reread(PET, implicit=True)):
        assert holds(condition, ds) is expected, ds


def test_keyword_and_tag_name_the_same_attribute() -> None:
    by_keyword, _ = parse_attr("SequenceName")
    by_tag, _ = parse_attr("(0018,0024)")
    assert by_keyword is not None and by_tag is not None
    assert by_keyword.key == by_tag.key


def test_file_meta_is_read_for_group_0002() -> None:
    buffer = io.BytesIO()
    ds = dataset(Modality="MR", SOPClassUID="1.2.3", SOPInstanceUID="1.2.3.4")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.save_as(buffer, enforce_file_format=True)
    ds = dcmread(io.BytesIO(buffer.getvalue()), stop_before_pixels=True)
    assert holds({"attr": "TransferSyntaxUID", "op": "==", "value": "1.2.840.10008.1.2.1"}, ds)


@pytest.mark.parametrize(
    ("summary", "condition", "expected"),
    [
        ({"num_files": 30}, {"attr": "summary.num_files", "op": ">", "value": 20}, True),
        ({"num_files": 30}, {"attr": "summary.num_files", "op": "<", "value": 20}, False),
        (
            {"calling_ae": "MR_1 "},
            {"attr": "summary.calling_ae", "op": "==", "value": "MR_1"},
            True,
        ),
        (
            {"calling_ae": ["A", "B"]},
            {"attr": "summary.calling_ae", "op": "contains", "value": "B"},
            True,
        ),
        (
            {"called_ae": "FIONA"},
            {"attr": "summary.called_ae", "op": "in", "value": ["FIONA"]},
            True,
        ),
        ({"calling_ip": "10.0.0.7"}, {"attr": "summary.calling_ip", "value": r"^10\."}, True),
        ({}, {"attr": "summary.calling_ip", "op": "not_exists"}, True),
        ({"calling_ip": None}, {"attr": "summary.calling_ip", "op": "exists"}, False),
    ],
)
def test_summary_fields(summary: dict[str, Any], condition: dict[str, Any], expected: bool) -> None:
    assert holds(condition, MR, summary) is expected


def test_unknown_summary_field_is_an_error_at_run_time_too() -> None:
    with pytest.raises(ValueError, match="unknown summary field 'files'"):
        RuleInput(MR, {"files": 3})


def test_series_summary_document_maps_to_fields() -> None:
    doc = {"NumFiles": 12, "CallingAETitle": "MR_1", "CalledAETitle": "FIONA", "PeerIP": "::1"}
    inp = RuleInput.from_series_summary(MR, doc)
    assert inp.summary == {
        "num_files": 12,
        "calling_ae": "MR_1",
        "called_ae": "FIONA",
        "calling_ip": "::1",
    }


# --------------------------------------------------------------------------- groups, references

GROUPS = {
    "mr": {"conditions": [{"attr": "Modality", "op": "==", "value": "MR"}]},
    "any_ok": {
        "conditions": [{"any": [{"attr": "Modality", "op": "==", "value": "CT"}, {"rule": "mr"}]}]
    },
    "all_fails": {
        "conditions": [{"all": [{"rule": "mr"}, {"attr": "ProtocolName", "op": "exists"}]}]
    },
    "not_ok": {"conditions": [{"not": {"rule": "all_fails"}}]},
    "negated_group": {"conditions": [{"any": [{"rule": "mr"}], "negate": True}]},
    "nested": {
        "conditions": [
            {
                "all": [
                    {
                        "any": [
                            {"not": {"attr": "Modality", "op": "==", "value": "MR"}},
                            {"attr": "ImageType", "op": "contains", "value": "M"},
                        ]
                    }
                ]
            }
        ]
    },
    "not_mr": {"conditions": [{"not_rule": "mr"}]},
    "helper": {"internal": True, "conditions": [{"rule": "mr"}]},
    "renamed": {"label": "T1", "conditions": [{"rule": "helper"}]},
    "also_t1": {"label": "T1", "conditions": [{"rule": "not_mr"}]},
}


def test_groups_references_and_labels() -> None:
    ruleset = rules(GROUPS)
    assert ruleset.matching(MR) == {"mr", "any_ok", "not_ok", "nested", "renamed"}
    assert ruleset.classify(MR) == {"mr", "any_ok", "not_ok", "nested", "T1"}  # helper: none
    assert ruleset.matches("helper", MR) and not ruleset.matches("not_mr", MR)
    assert ruleset.labels == {
        "mr",
        "any_ok",
        "all_fails",
        "not_ok",
        "negated_group",
        "nested",
        "not_mr",
        "T1",
    }
    ct = dataset(Modality="CT")
    assert ruleset.classify(ct) == {"any_ok", "not_ok", "nested", "negated_group", "not_mr", "T1"}


def test_rules_across_files_share_names(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "rules:\n  mr:\n    conditions: [{attr: Modality, op: '==', value: MR}]\n"
    )
    (tmp_path / "b.yaml").write_text("rules:\n  t1:\n    conditions: [{rule: mr}]\n")
    assert load_rulesets([tmp_path / "a.yaml", tmp_path / "b.yaml"]).classify(MR) == {"mr", "t1"}
    (tmp_path / "c.yaml").write_text(
        "rules:\n  mr:\n    conditions: [{attr: Modality, value: M}]\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_rulesets([tmp_path / "a.yaml", tmp_path / "c.yaml"])
    assert [str(i) for i in exc.value.issues] == [
        f"{tmp_path / 'c.yaml'}:2 rules.mr: rule 'mr' is already defined in {tmp_path / 'a.yaml'}:2"
    ]


# --------------------------------------------------------------------------- validation


def test_messages_match_golden_file(capsys: pytest.CaptureFixture[str]) -> None:
    status = run_validate([BROKEN])
    text = f"$ fiona validate {BROKEN}\n{capsys.readouterr().out}(exit {status})\n"
    if os.environ.get("FIONA_UPDATE_GOLDEN"):
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")


def test_every_broken_file_marks_its_faults() -> None:
    for file in BROKEN.iterdir():
        assert "FAULT" in file.read_text(encoding="utf-8"), file
        assert check_ruleset(file), f"{file} has no problem"


def test_cycle_and_dangling_reference_messages() -> None:
    with pytest.raises(ConfigError) as exc:
        rules(
            {
                "a": {"conditions": [{"rule": "b"}]},
                "b": {"conditions": [{"all": [{"rule": "c"}]}]},
                "c": {"conditions": [{"not": {"rule": "a"}}]},
                "d": {"conditions": [{"rule": "e"}]},
            }
        )
    assert [i.message for i in exc.value.issues] == [
        "rule reference cycle: a -> b -> c -> a",
        "rule 'e' is not defined",
    ]


def test_inline_rules_report_their_place_in_the_embedding_file() -> None:
    text = (
        "name: p\nrouting:\n  rules:\n    match:\n      conditions:\n"
        "        - {attr: Modality, op: '=', value: MR}\n"
    )
    loader = LineLoader(text)
    doc = loader.load_document()
    assert isinstance(doc, dict)
    with pytest.raises(ConfigError) as exc:
        compile_rules(
            doc["routing"]["rules"], Source(Path("p.yaml"), ("routing", "rules"), loader.lines)
        )
    assert [str(i) for i in exc.value.issues] == [
        "p.yaml:6 routing.rules.match.conditions[0].op: unknown operator '=' (did you mean '=='?);"
        " operators: regexp, contains, ==, !=, <, >, approx, exists, not_exists, in"
    ]
    with pytest.raises(ConfigError) as exc:
        compile_rules({"x": {"conditions": "no"}}, Path("q.yaml"), ("rules",))
    assert [str(i) for i in exc.value.issues] == [
        "q.yaml rules.x.conditions: expected array, found string 'no'"
    ]


def test_schema_is_complete_and_matches_the_code() -> None:
    schema = json.loads((REPO / "schemas" / "ruleset.schema.json").read_text())
    Draft202012Validator.check_schema(schema)

    def walk(node: dict[str, Any], where: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, where
            for key, sub in node["properties"].items():
                assert "description" in sub and "default" in sub, f"{where}.{key}"
                walk(sub, f"{where}.{key}")

    walk(schema, "root")
    for name, definition in schema["$defs"].items():
        walk(definition, name)
    condition = schema["$defs"]["condition"]["properties"]
    assert set(condition) == set(CONDITION_KEYS)
    assert condition["op"]["examples"] == list(OPERATORS)


# --------------------------------------------------------------------------- series level


def test_series_level_labels_need_every_instance() -> None:
    ruleset = rules(
        {
            "original": {
                "series_level": True,
                "conditions": [{"attr": "ImageType[0]", "op": "==", "value": "ORIGINAL"}],
            },
            "derived": {"conditions": [{"attr": "ImageType[0]", "op": "==", "value": "DERIVED"}]},
        }
    )
    labels = ruleset.series_labels()
    assert labels.labels == frozenset()
    labels.add(ruleset.classify(dataset(ImageType=["ORIGINAL", "PRIMARY"])))
    assert labels.labels == {"original"}
    labels.add(ruleset.classify(dataset(ImageType=["DERIVED", "PRIMARY"])))
    assert labels.labels == {"derived"}
    labels.add(ruleset.classify(dataset(ImageType=["ORIGINAL", "PRIMARY"])))
    assert labels.labels == {"derived"}  # lost for good
    saved = json.loads(json.dumps(labels.to_json()))
    assert saved == {
        "instances": 3,
        "labels": ["derived"],
        "series_level": ["original"],
        "every": [],
    }
    again = SeriesLabels.from_json(saved)
    assert again == labels and again.labels == {"derived"}


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"instances": -1, "labels": [], "series_level": [], "every": []},
        {"instances": 1, "labels": "x", "series_level": [], "every": []},
        {"instances": 1, "labels": ["a"], "series_level": ["a"], "every": []},
        {"instances": 1, "labels": [], "series_level": [], "every": ["b"]},
    ],
)
def test_series_labels_reject_bad_documents(doc: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="series labels"):
        SeriesLabels.from_json(doc)


# --------------------------------------------------------------------------- JMESPath

JMES = {
    "three_refs": {"conditions": [{"jmespath": 'length("00081140".Value) > `2`'}]},
    "derived": {
        "conditions": [{"jmespath": '"00080008".Value', "op": "contains", "value": "DERIVED"}]
    },
    "echo": {"conditions": [{"jmespath": '"00180081".Value[0]', "op": ">", "value": 2}]},
    "mr": {"conditions": [{"attr": "Modality", "op": "==", "value": "MR"}]},
    "mr_and_derived": {"conditions": [{"rule": "mr"}, {"rule": "derived"}]},
}


def test_jmespath_conditions() -> None:
    ruleset = rules(JMES)
    refs = [dataset(ReferencedSOPInstanceUID=f"1.2.{i}") for i in range(3)]
    ds = dataset(
        Modality="MR",
        ImageType=["DERIVED", "PRIMARY"],
        EchoTime="2.5",
        ReferencedImageSequence=refs,
    )
    assert ruleset.classify(ds) == {"three_refs", "derived", "echo", "mr", "mr_and_derived"}
    assert ruleset.classify(dataset(Modality="MR")) == {"mr"}
    assert ruleset.dynamic == {
        ruleset.index[n] for n in ("three_refs", "derived", "echo", "mr_and_derived")
    }


def test_jmespath_rules_are_not_memoised_by_the_attributes_others_read() -> None:
    ruleset = rules(JMES)
    one = reread(dataset(Modality="MR", ImageType=["DERIVED"], SOPInstanceUID="1.2.3"))
    two = reread(dataset(Modality="MR", ImageType=["ORIGINAL"], SOPInstanceUID="1.2.3"))
    assert "derived" in ruleset.classify(one)
    assert "derived" not in ruleset.classify(two)  # same Modality: same memo key for 'mr'


# --------------------------------------------------------------------------- explain


def test_explain_shows_each_condition_with_what_it_saw() -> None:
    ruleset = rules(
        {
            "mr": {
                "internal": True,
                "conditions": [{"attr": "Modality", "op": "==", "value": "MR"}],
            },
            "t1": {
                "series_level": True,
                "conditions": [
                    {"rule": "mr"},
                    {
                        "any": [
                            {"attr": "SeriesDescription", "value": "(?i)t1"},
                            {"attr": "InversionTime", "op": "<", "value": 1500},
                        ]
                    },
                    {"attr": "ImageType[*]", "op": "in", "value": ["MPR", "MIP"], "negate": True},
                ],
            },
        }
    )
    lines = [line for trace in ruleset.explain(MR) for line in trace.lines()]
    assert lines == [
        "rule mr (internal): yes",
        "  conditions[0]: Modality == 'MR' (saw 'MR') -> yes",
        "rule t1 (label t1, series level): yes",
        "  conditions[0]: rule mr -> yes",
        "  conditions[1]: any of 2 -> yes",
        "    conditions[1].any[0]: SeriesDescription regexp '(?i)t1' (saw 't1_mprage_sag') -> yes",
        "    conditions[1].any[1]: InversionTime < 1500 (saw (missing)) -> no",
        "  conditions[2]: not ImageType[*] in ['MPR', 'MIP']"
        " (saw any of 'ORIGINAL', 'PRIMARY', 'M', 'ND') -> yes",
    ]


# --------------------------------------------------------------------------- speed paths are exact


def _synthetic() -> list[Dataset]:
    spec = make_study_spec(7)
    return make_study(spec, [*MR_SERIES.values(), *CT_SERIES.values()], size=16)


def test_raw_decoding_equals_pydicom_conversion() -> None:
    """Every attribute the default rule sets read gives the same value either way."""
    classify = load_rulesets(ruleset_files(CLASSIFY))
    attrs = {node.attr for rule in classify.rules for node in rule.nodes() if hasattr(node, "attr")}
    extra = dataset(
        PatientName="DOE^JANE",
        EchoNumbers=[1, 2],
        Rows=512,
        PixelSpacing=["0.5", "0.5"],
        ScanOptions="",
        private=[(0x00431039, "IS", ["1000", "8", "0", "0"])],
    )
    for source in [*_synthetic()[::9], extra]:
        for implicit in (False, True):
            raw = reread(source, implicit)
            converted = reread(source, implicit)
            converted.walk(lambda ds, elem: elem.value)  # decode every element through pydicom
            for attr in [
                *attrs,
                parse_attr("PatientName")[0],
                parse_attr("PixelSpacing")[0],
                parse_attr("EchoNumbers")[0],
                parse_attr("(0043,1039)")[0],
            ]:
                assert attr is not None
                fast = attr.read(RuleInput(raw))
                slow = attr.read(RuleInput(converted))
                assert fast == slow, (attr.text, implicit, fast, slow)


def test_memo_and_index_give_the_unoptimised_answer() -> None:
    classify = load_rulesets(ruleset_files(CLASSIFY))
    projects = {
        f"p{k}": rules(
            {
                "match": {
                    "conditions": [
                        {"attr": "Modality", "op": "in", "value": ["MR", "CT"][: k % 2 + 1]},
                        {"attr": "summary.calling_ae", "op": "==", "value": f"AE{k % 3}"},
                        {"rule": "study"},
                    ]
                },
                "study": {
                    "internal": True,
                    "conditions": [
                        {"attr": "StudyDescription", "value": "BRAIN"},
                        {"attr": "PatientSex", "op": "in", "value": ["F", "M", "O"]},
                        {"attr": "StudyDate", "op": ">", "value": 20000101},
                        {"attr": "AccessionNumber", "op": "exists"},
                    ],
                },
                "t1": {
                    "conditions": [
                        {"attr": "Modality", "op": "==", "value": "MR"},
                        {"rule": "match"},
                        {"attr": "SeriesDescription", "value": "t1"},
                    ]
                },
            }
        )
        for k in range(6)
    }
    group = RuleSetGroup(projects)
    for n, ds in enumerate(_synthetic()):
        raw = reread(ds)
        for _ in range(2):  # the second time from the memo
            inp = RuleInput(raw, {"calling_ae": f"AE{n % 3}"})
            plain = {t.name for t in classify.explain(inp) if t.result and t.label}
            assert classify.matching(inp) == plain
            matched = group.matching(inp)
            for name, member in projects.items():
                assert matched[name] == {
                    t.name for t in member.explain(inp) if t.result and t.label
                }


def test_memo_keeps_instances_apart_that_differ_in_one_value() -> None:
    ruleset = load_rulesets(ruleset_files(CLASSIFY))
    spec = make_study_spec(3)
    t1 = make_study(spec, [MR_SERIES["t1_mprage"]], size=16)[0]
    first = ruleset.classify(reread(t1))
    t1.SequenceName = "*fl2d1"
    t1.SeriesDescription = "sag 3d"
    second = ruleset.classify(reread(t1))
    assert "t1" in first and "t1" in second  # physics still says T1
    t1.InversionTime = "2000"
    assert "t1" not in ruleset.classify(reread(t1))


# --------------------------------------------------------------------------- golden cases


def _case_files() -> list[Path]:
    return sorted(CLASSIFY.glob("*.cases/*.json"))


@pytest.mark.parametrize("case_file", _case_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden_case(case_file: Path) -> None:
    ruleset = load_ruleset(
        case_file.parent.with_name(case_file.parent.name.removesuffix(".cases") + ".yaml")
    )
    case = load_case(case_file)
    if case.series:
        labels = ruleset.series_labels()
        for ds in case.instances:
            labels.add(ruleset.classify(RuleInput(ds, case.summary)))
        got = labels.labels
    else:
        got = ruleset.classify(RuleInput(case.instances[0], case.summary))
    assert got == case.expected, case.description


def test_every_classify_ruleset_has_cases_for_each_label() -> None:
    files = ruleset_files(CLASSIFY)
    assert files
    for file in files:
        count, problems = check_cases(file)
        assert count >= 3 and problems == [], (file, problems)


def test_test_rules_reports_a_mismatch_with_its_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ruleset = tmp_path / "rulesets" / "mini.yaml"
    ruleset.parent.mkdir()
    ruleset.write_text("rules:\n  mr:\n    conditions: [{attr: Modality, op: '==', value: MR}]\n")
    assert run_test_rules([ruleset]) == 1
    assert "mini.yaml: no cases" in capsys.readouterr().out
    cases = tmp_path / "rulesets" / "mini.cases"
    cases.mkdir()
    case = {
        "description": "synthetic CT",
        "input": {"00080060": {"vr": "CS", "Value": ["CT"]}},
        "expected": ["mr"],
    }
    (cases / "ct.json").write_text(json.dumps(case))
    assert run_test_rules([tmp_path / "rulesets"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "missing:  mr" in out
    assert "conditions[0]: Modality == 'MR' (saw 'CT') -> no" in out
    case["expected"] = []
    (cases / "ct.json").write_text(json.dumps(case))
    assert run_test_rules([ruleset]) == 1  # no case expects 'mr'
    assert "label 'mr' has no case expecting it" in capsys.readouterr().out
    (cases / "mr.json").write_text(
        json.dumps(
            {**case, "input": {"00080060": {"vr": "CS", "Value": ["MR"]}}, "expected": ["mr"]}
        )
    )
    assert run_test_rules([ruleset]) == 0


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"input": {}, "series": [], "expected": [], "description": "x"}, "exactly one of"),
        ({"input": {}, "expected": [], "description": ""}, "'description'"),
        ({"input": {}, "expected": "mr", "description": "x"}, "'expected'"),
        ({"input": {}, "expected": [], "description": "x", "outcome": 1}, "unknown keys: outcome"),
        ({"input": {}, "expected": [], "description": "x", "summary": {"aet": 1}}, "summary"),
    ],
)
def test_bad_case_files(tmp_path: Path, doc: dict[str, Any], message: str) -> None:
    file = tmp_path / "case.json"
    file.write_text(json.dumps(doc))
    with pytest.raises(CaseError, match=message):
        load_case(file)


def test_cli_test_rules_and_validate_rulesets() -> None:
    assert cli_main(["test-rules"]) == 0
    assert cli_main(["validate", "rulesets"]) == 0
    assert cli_main(["validate", str(BROKEN / "operators.yaml")]) == 1


def test_yaml_example_in_the_readme_loads(tmp_path: Path) -> None:
    text = (REPO / "rulesets" / "README.md").read_text(encoding="utf-8")
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(example)["rules"]
    file = tmp_path / "example.yaml"
    file.write_text(example)
    assert check_ruleset(file) == []


def test_memo_key_tells_apart_equal_bytes_under_different_vrs() -> None:
    ruleset = rules({"negative": {"conditions": [{"attr": "(0019,1001)", "op": "<", "value": 0}]}})
    unsigned = dataset(
        Modality="MR", private=[(0x00190010, "LO", "ACME"), (0x00191001, "US", 65535)]
    )
    signed = dataset(Modality="MR", private=[(0x00190010, "LO", "ACME"), (0x00191001, "SS", -1)])
    assert ruleset.classify(reread(unsigned)) == frozenset()  # the same two bytes, ff ff
    assert ruleset.classify(reread(signed)) == {"negative"}


# --------------------------------------------------------------------------- header tags


def _part10(ds: Dataset, path: Path, implicit: bool) -> Path:
    """``ds`` as a Part 10 file, as the archive holds it."""
    copy = Dataset(ds)
    copy.file_meta = FileMetaDataset()
    copy.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    copy.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.4")
    copy.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3.4")
    copy.preamble = b"\0" * 128
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    return path


def test_header_tags_classify_as_the_whole_header(tmp_path: Path) -> None:
    """Every golden case and synthetic series, read for the rule set's header_tags only,
    gets the labels (and rule names) of the whole header, explicit and implicit VR."""
    work: list[tuple[RuleSet, Dataset, dict[str, Any]]] = []
    for case_file in _case_files():
        ruleset = load_ruleset(
            case_file.parent.with_name(case_file.parent.name.removesuffix(".cases") + ".yaml")
        )
        case = load_case(case_file)
        work += [(ruleset, ds, dict(case.summary or {})) for ds in case.instances]
    classify = load_rulesets(ruleset_files(CLASSIFY))
    work += [(classify, ds, {"num_files": 10}) for ds in _synthetic()]
    smaller = 0
    for n, (ruleset, ds, summary) in enumerate(work):
        assert ruleset.header_tags is not None
        for implicit in (False, True):
            path = _part10(ds, tmp_path / f"{n}-{implicit}.dcm", implicit)
            whole = read_header_dataset(path)
            part = read_header_dataset(path, ruleset.header_tags)
            smaller += len(part) < len(whole)
            for reader in (ruleset.classify, ruleset.matching):
                assert reader(RuleInput(part, summary)) == reader(RuleInput(whole, summary))
    assert smaller > len(work)  # most reads were selective


def test_header_tags_are_none_when_a_rule_reads_the_whole_header() -> None:
    plain = rules({"echo": {"conditions": [{"attr": "EchoTime", "op": ">", "value": 2}]}})
    assert plain.header_tags is not None and 0x00180081 in plain.header_tags
    dynamic = rules(
        {
            "t": {"internal": True, "conditions": [{"jmespath": '"00180081".Value[0]'}]},
            "x": {"conditions": [{"rule": "t"}, {"attr": "EchoTime", "op": "exists"}]},
        }
    )
    assert dynamic.header_tags is None
