"""Rules benchmark: instances/s through classification and project matching, one core.

Run from the repo root: ``python bench/rules.py [--studies N] [--repeat R]``.

What is timed: ``RuleInput(dataset, summary)`` plus evaluation, for datasets already read with
``dcmread(..., stop_before_pixels=True)`` from in-memory Part 10 bytes (the read itself is
untimed and reported apart). Every pass reads the files afresh and compiles the rule sets
afresh, so no memo or decoded value survives from one pass to the next. Rule sets:

- classify: every rule set under ``rulesets/classify/`` (one RuleSet);
- projects: 50 generated projects of 20 rules each (AE titles, institution, study description,
  modality, series selection, dates; ==, in, regexp, <, >, approx, exists, references), as one
  RuleSetGroup and, for comparison, as 50 RuleSets asked one after the other.

Three corpora of synthetic studies (tests/synth.py, MR and CT; every fourth study CT):
"short", the test suite's series (3 to 24 instances each) whose values repeat within a series
as a scanner sends them; "clinical", the same protocols with clinical series lengths (176-slice
MPRAGE, 360-image BOLD, 150-slice CT); and "cold", the short corpus with SeriesDescription and
StudyDescription made unique per instance, so no memo entry is ever reused. Before timing, the
optimised results are checked against the unoptimised ``explain`` path on a sample. A
calibration loop before and after shows how steady the machine was.
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from engine.rules import (  # noqa: E402
    RuleInput,
    RuleSet,
    RuleSetGroup,
    compile_rules,
    load_rulesets,
    ruleset_files,
)
from tests.synth import CT_SERIES, MR_SERIES, make_study, make_study_spec  # noqa: E402

AE_POOL = ["MR_PRISMA1", "MR_SKYRA2", "MR_ACHIEVA", "CT_FORCE1", "CT_REVO", "PACS_A", "PACS_B"]
INSTITUTIONS = ["SYNTHETIC GENERAL HOSPITAL", "SYNTH UNIVERSITY CLINIC", "FAKE MEMORIAL"]
STUDY_PATTERNS = ["(?i)brain", "(?i)head", "(?i)neuro", "(?i)research", "(?i)w/?o contrast"]
Item = tuple[bytes, dict[str, Any]]


# --------------------------------------------------------------------------- rules


def project_rules(k: int) -> dict[str, Any]:
    """Twenty plausible routing rules of one project: helpers and seven selections."""
    rng = random.Random(k)
    aes = rng.sample(AE_POOL, rng.randint(1, 3))
    site = rng.choice(INSTITUTIONS)

    def cond(attr: str, op: str, value: object = None, **extra: object) -> dict[str, Any]:
        out: dict[str, Any] = {"attr": attr, "op": op, **extra}
        if value is not None:
            out["value"] = value
        return out

    return {
        "sender": {"internal": True, "conditions": [cond("summary.calling_ae", "in", aes)]},
        "addressed": {"internal": True, "conditions": [cond("summary.called_ae", "==", "FIONA")]},
        "site": {"internal": True, "conditions": [cond("InstitutionName", "==", site)]},
        "study": {
            "internal": True,
            "conditions": [cond("StudyDescription", "regexp", rng.choice(STUDY_PATTERNS))],
        },
        "since": {"internal": True, "conditions": [cond("StudyDate", ">", 20180101 + k)]},
        "field": {
            "internal": True,
            "conditions": [
                cond("MagneticFieldStrength", "approx", rng.choice([1.5, 3.0]), tolerance=0.1)
            ],
        },
        "adult": {"internal": True, "conditions": [cond("PatientAge", "regexp", "^0[1-9][0-9]Y")]},
        "no_localizer": {
            "internal": True,
            "conditions": [cond("ImageType", "contains", "LOCALIZER", negate=True)],
        },
        "accession": {"internal": True, "conditions": [cond("AccessionNumber", "regexp", "^SYN")]},
        "t1_series": {
            "internal": True,
            "conditions": [cond("SeriesDescription", "regexp", "(?i)(t1|mprage)")],
        },
        "diffusion": {
            "internal": True,
            "conditions": [
                {
                    "any": [
                        cond("DiffusionBValue", "exists"),
                        cond("SequenceName", "regexp", r"^\*?ep_b"),
                    ]
                }
            ],
        },
        "fmri": {"internal": True, "conditions": [cond("ImageType", "contains", "FMRI")]},
        "head_ct": {
            "internal": True,
            "conditions": [
                cond("SeriesDescription", "regexp", "(?i)head"),
                cond("SliceThickness", "<", 6),
            ],
        },
        "match": {
            "conditions": [
                cond("summary.calling_ae", "in", aes),
                {"rule": "addressed"},
                {"rule": "site"},
                {"rule": "study"},
                {"rule": "since"},
                {"rule": "adult"},
                {"rule": "accession"},
            ]
        },
        "t1": {
            "conditions": [
                cond("Modality", "==", "MR"),
                {"rule": "match"},
                {"rule": "t1_series"},
                {"rule": "no_localizer"},
                {"rule": "field"},
            ]
        },
        "t2": {
            "conditions": [
                cond("Modality", "==", "MR"),
                {"rule": "match"},
                cond("SeriesDescription", "regexp", "(?i)t2_tse"),
            ]
        },
        "flair": {
            "conditions": [
                cond("Modality", "in", ["MR"]),
                {"rule": "match"},
                cond("InversionTime", ">", 1500),
            ]
        },
        "dwi": {
            "conditions": [cond("Modality", "==", "MR"), {"rule": "match"}, {"rule": "diffusion"}]
        },
        "bold": {
            "conditions": [
                cond("Modality", "==", "MR"),
                {"rule": "match"},
                {"rule": "fmri"},
                cond("NumberOfTemporalPositions", ">", 1),
            ]
        },
        "ct_head": {
            "conditions": [
                cond("Modality", "==", "CT"),
                {"rule": "match"},
                {"rule": "head_ct"},
                {"not_rule": "sender", "negate": True},
            ]
        },
    }


def projects(n: int) -> dict[str, RuleSet]:
    return {f"p{k:02d}": compile_rules(project_rules(k), Path(f"p{k:02d}.yaml")) for k in range(n)}


# --------------------------------------------------------------------------- corpus


#: Series lengths closer to a clinical protocol than tests/synth.py's (kept short for tests).
CLINICAL = {
    "localizer": {"n_slices": 3},
    "t1_mprage": {"n_slices": 176},
    "t2_tse": {"n_slices": 30},
    "flair": {"n_slices": 30},
    "dwi": {"n_slices": 30},  # x 2 b-values
    "bold": {"n_slices": 36, "n_repeats": 10},
    "ct_head": {"n_slices": 150},
}


def corpus(n_studies: int, kind: str) -> list[Item]:
    """Part 10 bytes and the series summary of every instance of n synthetic studies.

    ``kind``: "short" (tests/synth.py's series, 3 to 24 instances), "clinical" (CLINICAL
    lengths) or "cold" (short, with SeriesDescription and StudyDescription unique per instance).
    """
    items: list[Item] = []
    unique = 0
    for seed in range(n_studies):
        rng = random.Random(seed)
        modality = "CT" if seed % 4 == 3 else "MR"
        spec = make_study_spec(seed, institution_name=rng.choice(INSTITUTIONS))
        series = list(CT_SERIES.values()) if modality == "CT" else list(MR_SERIES.values())
        if kind == "clinical":
            series = [replace(s, **CLINICAL.get(s.name, {})) for s in series]
        datasets = make_study(spec, series, size=32)
        calling = rng.choice(AE_POOL)
        counts: dict[str, int] = {}
        for ds in datasets:
            counts[ds.SeriesInstanceUID] = counts.get(ds.SeriesInstanceUID, 0) + 1
        for ds in datasets:
            if kind == "cold":
                unique += 1
                ds.SeriesDescription = f"{ds.SeriesDescription} {unique}"
                ds.StudyDescription = f"{ds.StudyDescription} {unique}"
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.save_as(buffer, enforce_file_format=True)
            summary = {
                "num_files": counts[ds.SeriesInstanceUID],
                "calling_ae": calling,
                "called_ae": "FIONA",
                "calling_ip": "10.0.0.7",
            }
            items.append((buffer.getvalue(), summary))
    return items


def read(items: list[Item]) -> tuple[list[tuple[Dataset, dict[str, Any]]], float]:
    start = time.perf_counter()
    out = [(dcmread(io.BytesIO(b), stop_before_pixels=True), s) for b, s in items]
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------- checks and timing


def _plain(ruleset: RuleSet, inp: RuleInput) -> frozenset[str]:
    return frozenset(t.name for t in ruleset.explain(inp) if t.result and t.label is not None)


def verify(items: list[Item], sample: int) -> int:
    """Optimised results (memo, index, fast decoding) equal the unoptimised explain path."""
    classify = load_rulesets(ruleset_files(REPO / "rulesets" / "classify"))
    members = projects(50)
    group = RuleSetGroup(members)
    datasets, _ = read(items[:sample])
    for ds, summary in datasets:
        inp = RuleInput(ds, summary)
        assert classify.matching(inp) == _plain(classify, inp)
        matched = group.matching(inp)
        for name, member in members.items():
            assert matched[name] == _plain(member, inp), name
    return len(datasets)


Step = Callable[[RuleInput], object]


def timed(
    items: list[Item], repeat: int, make: Callable[[RuleSet, dict[str, RuleSet]], Step]
) -> list[float]:
    """Instances/s of ``repeat`` fresh passes (fresh datasets, fresh rule sets and memos)."""
    rates = []
    for _ in range(repeat):
        datasets, _ = read(items)
        step = make(load_rulesets(ruleset_files(REPO / "rulesets" / "classify")), projects(50))
        gc.collect()
        gc.freeze()  # the engine holds one dataset at a time, not thousands for the GC to scan
        start = time.perf_counter()
        for ds, summary in datasets:
            step(RuleInput(ds, summary))
        rates.append(len(datasets) / (time.perf_counter() - start))
        gc.unfreeze()
    return rates


def both(classify: RuleSet, members: dict[str, RuleSet]) -> Step:
    group = RuleSetGroup(members)

    def step(inp: RuleInput) -> object:
        return classify.classify(inp), group.matching(inp)

    return step


def one_by_one(classify: RuleSet, members: dict[str, RuleSet]) -> Step:
    sets = list(members.values())
    return lambda inp: [m.matching(inp) for m in sets]


RUNS: dict[str, Callable[[RuleSet, dict[str, RuleSet]], Step]] = {
    "classify (43 rules)": lambda c, m: c.classify,
    "projects: group of 50 x 20 rules": lambda c, m: RuleSetGroup(m).matching,
    "classify + project group": both,
    "projects: 50 rule sets in turn": one_by_one,
}


def calibration(passes: int = 9) -> list[float]:
    """ms for a fixed pure-Python loop: how fast, and how steady, this machine is now."""
    out = []
    for _ in range(passes):
        start = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12, help="short/cold studies (default 12)")
    parser.add_argument("--clinical", type=int, default=4, help="clinical studies (default 4)")
    parser.add_argument("--repeat", type=int, default=7, help="passes per figure (default 7)")
    args = parser.parse_args()

    start = time.perf_counter()
    classify = load_rulesets(ruleset_files(REPO / "rulesets" / "classify"))
    members = projects(50)
    compile_ms = (time.perf_counter() - start) * 1e3
    corpora = {
        "short": corpus(args.studies, "short"),
        "clinical": corpus(args.clinical, "clinical"),
        "cold": corpus(args.studies, "cold"),
    }
    checked = sum(verify(items, 300) for items in corpora.values())
    _, read_s = read(corpora["short"])
    n_short = len(corpora["short"])
    before = calibration()
    print(f"python {sys.version.split()[0]}, pydicom {pydicom.__version__}, one core")
    print(
        f"corpora: short {n_short} instances ({args.studies} studies, series of 3-24), "
        f"clinical {len(corpora['clinical'])} ({args.clinical} studies, series of 3-360), "
        f"cold {len(corpora['cold'])} (short, every instance distinct)"
    )
    print(
        f"compile: classify ({len(classify.rules)} rules) + 50 projects "
        f"({sum(len(m.rules) for m in members.values())} rules) in {compile_ms:.0f} ms"
    )
    print(
        f"untimed: dcmread(stop_before_pixels=True) from bytes {1e6 * read_s / n_short:.0f} µs "
        f"per instance ({n_short / read_s:.0f}/s)"
    )
    print(f"checked against the unoptimised explain path: {checked} instances")
    print()
    print(
        f"{'instances/s over ' + str(args.repeat) + ' passes':36} {'corpus':8} "
        f"{'median':>9} {'best':>9} {'µs (median)':>12}"
    )
    for label, make in RUNS.items():
        for name, items in corpora.items():
            rates = timed(items, args.repeat, make)
            median = statistics.median(rates)
            print(f"{label:36} {name:8} {median:9.0f} {max(rates):9.0f} {1e6 / median:12.1f}")
    after = calibration()
    spread = [f"{min(c):.0f}-{max(c):.0f}" for c in (before, after)]
    print()
    print(
        f"calibration, 1M-step Python loop (ms, min-max) before: {spread[0]}, after: "
        f"{spread[1]}; the spread is this machine's noise, compare figures within one run"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
