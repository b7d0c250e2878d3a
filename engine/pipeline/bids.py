"""BIDS for the ``convert`` step (``format: bids``): the label mapping, names, dataset files.

The mapping (``rulesets/bids/default.yaml``, or a step's own ``bids.series``) maps series
labels (the classify step's) to a BIDS datatype and suffix, ``t1: anat/T1w``, or to a mapping
with ``bids`` and, for ``func``, ``task``: a fixed label or ``{description}`` (the letters and
digits of the de-identified SeriesDescription (0008,103E)). A series takes the first entry, in
the mapping's order, whose label it has; a series with none is left out of the dataset.

Names (BIDS 1.8): ``sub-<pseudonym>/ses-<session>/<datatype>/sub-<pseudonym>_ses-<session>
[_task-<task>][_echo-<n>][_run-<n>]_<suffix><ext>``. The subject label is the letters and digits
of the pseudonym the de-identified files carry (PatientID (0010,0020)); the session is the
letters and digits of the run's event, else a counter per subject (1, 2, ...) kept per study so
series that arrive late join their study's session. A second acquisition with the same name
(in a run, or arriving later) gets ``run-2``, ``run-3``...; the first keeps its name, since a file
already delivered is never renamed. A fieldmap series gives ``phasediff`` (its phase image, with
``EchoTime1``/``EchoTime2`` taken from the magnitude images when dcm2niix did not write them)
and ``magnitude1``/``magnitude2``.

:class:`DatasetState` keeps, in ``<data>/work/<project>/bids/``, what the next run needs:
sessions per study, names used, participants; and the dataset's own files
(``dataset_description.json``, ``participants.tsv``, ``README``, ``.bidsignore``), which every
run sends again so a destination always holds the latest ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.files import parse_file
from engine.config.issues import ConfigError, ConfigIssue, format_path
from engine.config.rulesets import rulesets_dir
from engine.config.sections import RulesetKind
from engine.store.fsio import write_durable

__all__ = [
    "BIDS_KIND",
    "BIDS_VERSION",
    "SUFFIXES",
    "BidsTarget",
    "DatasetState",
    "bids_label",
    "check_mapping",
    "default_mapping_file",
    "load_mapping",
]

BIDS_VERSION = "1.8.0"
#: The datatypes and suffixes a converted MR series may take (BIDS 1.8 raw data).
SUFFIXES: dict[str, frozenset[str]] = {
    "anat": frozenset(
        {"T1w", "T2w", "PDw", "T2starw", "FLAIR", "inplaneT1", "inplaneT2", "PDT2", "angio",
         "T1map", "T2map", "T2starmap", "R1map", "R2map", "PDmap", "UNIT1"}
    ),
    "func": frozenset({"bold", "cbv", "phase", "sbref"}),
    "dwi": frozenset({"dwi", "sbref"}),
    "fmap": frozenset({"phasediff", "magnitude1", "magnitude2", "phase1", "phase2",
                       "magnitude", "fieldmap", "epi"}),
    "perf": frozenset({"asl", "m0scan"}),
}  # fmt: skip
#: The ``task`` value that takes the task label from the series description.
FROM_DESCRIPTION = "{description}"
DEFAULT_TASK = "rest"
_LABEL = re.compile(r"[^A-Za-z0-9]")
#: Files of fiona's at a dataset's root that the BIDS validator is told to ignore.
BIDSIGNORE = ("manifest.json", "MD5SUMS")


def bids_label(text: str) -> str:
    """``text`` with everything but ASCII letters and digits removed (a BIDS label)."""
    return _LABEL.sub("", text)


@dataclass(frozen=True)
class BidsTarget:
    """One mapping entry: series with ``label`` become ``<datatype>/..._<suffix>``; ``task``
    (func only) is a fixed label or ``{description}``."""

    label: str
    datatype: str
    suffix: str
    task: str = ""


def default_mapping_file() -> Path:
    """``rulesets/bids/default.yaml``."""
    return rulesets_dir() / "bids" / "default.yaml"


def _entry(label: str, value: object) -> tuple[BidsTarget | None, str, tuple[str, ...]]:
    """(target, problem, sub-path of the problem) of one mapping entry."""
    task = ""
    where: tuple[str, ...] = ()
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"bids", "task"})
        if unknown:
            return None, f"unknown key '{unknown[0]}'; expected 'bids' and 'task'", ()
        task = str(value.get("task", ""))
        value, where = value.get("bids"), ("bids",)
    if not isinstance(value, str) or value.count("/") != 1:
        found = repr(value) if isinstance(value, str) else type(value).__name__
        return None, f"expected 'datatype/suffix' (as 'anat/T1w'), found {found}", where
    datatype, suffix = value.split("/")
    if datatype not in SUFFIXES:
        known = ", ".join(sorted(SUFFIXES))
        return None, f"unknown BIDS datatype '{datatype}'; expected one of {known}", where
    if suffix not in SUFFIXES[datatype]:
        known = ", ".join(sorted(SUFFIXES[datatype]))
        return None, f"'{suffix}' is not a suffix of {datatype}; expected one of {known}", where
    if task and datatype != "func":
        return None, f"'task' is for func series only, found it with {datatype}", ("task",)
    if task and task != FROM_DESCRIPTION and (bids_label(task) != task or not task):
        message = f"expected a task label of letters and digits or '{FROM_DESCRIPTION}'"
        return None, f"{message}, found '{task}'", ("task",)
    if datatype == "func" and not task:
        task = DEFAULT_TASK
    return BidsTarget(label, datatype, suffix, task), "", ()


def check_mapping(
    series: object, file: Path, base: tuple[str | int, ...]
) -> tuple[list[BidsTarget], list[ConfigIssue]]:
    """The targets of a ``series`` mapping (label -> target) and its problems, with JSON paths
    below ``base`` (lines are filled in by the caller)."""
    if not isinstance(series, Mapping) or not series:
        return [], [ConfigIssue(file, None, format_path(base), "expected a mapping of labels")]
    targets, issues = [], []
    for label, value in series.items():
        target, problem, sub = _entry(str(label), value)
        if target is None:
            issues.append(ConfigIssue(file, None, format_path((*base, str(label), *sub)), problem))
        else:
            targets.append(target)
    return targets, issues


def load_mapping(file: Path) -> list[BidsTarget]:
    """The targets of a mapping file (``series:`` at its top); ConfigError with file:line."""
    parsed = parse_file(file)
    if parsed.issues:
        raise ConfigError(parsed.issues)
    data = parsed.data if isinstance(parsed.data, Mapping) else {}
    targets, issues = check_mapping(data.get("series"), file, ("series",))
    if issues:
        located = [
            ConfigIssue(i.file, parsed.line_of(_split(i.path)), i.path, i.message) for i in issues
        ]
        raise ConfigError(located)
    return targets


def _check_mapping_file(file: Path) -> list[ConfigIssue]:
    """Every problem of a mapping file under ``rulesets/bids/`` (``fiona validate``)."""
    try:
        load_mapping(file)
    except ConfigError as exc:
        return list(exc.issues)
    return []


#: BIDS mapping files (``rulesets/bids/``): label -> datatype/suffix, as the convert step's
#: ``bids.series`` (registered by :mod:`engine.projects`).
BIDS_KIND = RulesetKind("bids", "steps/convert.schema.json#/properties/bids", _check_mapping_file)


def _split(path: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r"[.\[\]]", path) if p)


def target_of(labels: list[str], targets: list[BidsTarget]) -> BidsTarget | None:
    """The first target (in mapping order) whose label the series has."""
    return next((t for t in targets if t.label in labels), None)


class DatasetState:
    """The project's dataset bookkeeping in ``folder`` (see the module doc)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.file = folder / ".fiona" / "state.json"
        try:
            doc: dict[str, Any] = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            doc = {}
        self.sessions: dict[str, str] = dict(doc.get("sessions", {}))
        self.names: set[str] = set(doc.get("names", []))
        self.named: dict[str, str] = dict(doc.get("named", {}))
        self.participants: set[str] = set(doc.get("participants", []))

    def session(self, subject: str, study_uid: str, event: str) -> str:
        """The session label of a study: the event's label, else the subject's next counter."""
        key = f"{subject}/{study_uid}"
        if key not in self.sessions:
            taken = {v for k, v in self.sessions.items() if k.startswith(subject + "/")}
            label = bids_label(event)
            if not label:
                label = str(next(n for n in range(1, len(taken) + 2) if str(n) not in taken))
            self.sessions[key] = label
        return self.sessions[key]

    def claim(self, stem: str, key: str) -> str:
        """``stem`` (a path without extension, ending ``_<suffix>``) made unique with a
        ``run-<n>`` entity before the suffix when the name is taken; recorded as used by
        ``key`` (a converted volume: the de-identified series UID and dcm2niix's suffix), so
        converting the same volume again (a step re-run after a crash) gives the same name."""
        if key in self.named:
            return self.named[key]
        name, n = stem, 1
        head, suffix = stem.rsplit("_", 1)
        while name in self.names:
            n += 1
            name = f"{head}_run-{n}_{suffix}"
        self.names.add(name)
        self.named[key] = name
        return name

    def save(self) -> None:
        doc = {
            "sessions": self.sessions,
            "names": sorted(self.names),
            "named": self.named,
            "participants": sorted(self.participants),
        }
        write_durable(self.file, (json.dumps(doc, indent=2) + "\n").encode())

    def write_dataset_files(self) -> dict[str, Path]:
        """Write the dataset's own files; name below the dataset -> file."""
        description = {
            "Name": self.name,
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "GeneratedBy": [{"Name": "fiona", "Description": "dcm2niix on de-identified DICOM"}],
        }
        rows = "".join(f"sub-{p}\n" for p in sorted(self.participants))
        readme = (
            f"# {self.name}\n\nDe-identified MR series delivered by fiona: each series was"
            " de-identified by the project's profile and checked by its verification gate,"
            " converted to NIfTI with dcm2niix, and named from the series type its rule sets"
            " gave (T1w, T2w, FLAIR, dwi, bold, fieldmaps). Subjects are the project's"
            " pseudonyms; sessions are the project's events, or a count of the subject's"
            " studies. Dates and times of day are removed from the sidecars unless the"
            " project keeps dates.\n"
        )
        files = {
            "dataset_description.json": (json.dumps(description, indent=2) + "\n").encode(),
            "participants.tsv": f"participant_id\n{rows}".encode(),
            "README": readme.encode(),
            ".bidsignore": "".join(f"{n}\n" for n in BIDSIGNORE).encode(),
        }
        out = {}
        for name, data in files.items():
            write_durable(self.folder / name, data)
            out[name] = self.folder / name
        return out


def fieldmap_names(suffixes: list[str]) -> dict[str, str]:
    """dcm2niix volume suffix -> BIDS suffix for a phase-difference fieldmap series: the phase
    image (``_ph``) is ``phasediff``, the others ``magnitude1``, ``magnitude2`` in order."""
    out: dict[str, str] = {}
    magnitudes = [s for s in suffixes if "ph" not in s]
    for s in suffixes:
        if "ph" in s:
            out[s] = "phasediff"
    for i, s in enumerate(magnitudes[:2], start=1):
        out[s] = f"magnitude{i}"
    return out


def load_targets(options: Mapping[str, Any]) -> list[BidsTarget]:
    """The mapping of a convert step's ``bids`` options: its own ``series``, else the default
    file's."""
    bids = options.get("bids", {})
    if isinstance(bids, Mapping) and "series" in bids:
        targets, issues = check_mapping(bids["series"], Path("<options>"), ("bids", "series"))
        if issues:
            raise ConfigError(issues)
        return targets
    return load_mapping(default_mapping_file())
