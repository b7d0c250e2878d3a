"""The layers of engine/ (docs/architecture.md): the import contracts hold, and every section a
layer registers is described by the schemas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.config.schema import load_schema, schema_dir
from engine.config.sections import ProjectSection, register_section
from engine.projects import PROJECT_SECTIONS, RULESET_KINDS

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint_imports)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_every_project_section_is_a_property_of_the_project_schema() -> None:
    properties = load_schema("project")["properties"]
    keys = [section.key for section in PROJECT_SECTIONS]
    assert len(set(keys)) == len(keys)
    assert set(keys) <= set(properties)


def test_every_schema_a_section_or_kind_names_exists() -> None:
    for schema in [s.schema for s in PROJECT_SECTIONS] + [k.schema for k in RULESET_KINDS]:
        if not schema.endswith(".schema.json") and ".schema.json#" not in schema:
            continue  # generated data, described in words
        file = schema.split("#")[0]
        if "<" in file:  # one fragment per type: steps/<step>.schema.json
            assert list((schema_dir() / Path(file).parent).glob("*.schema.json")), schema
        else:
            assert (schema_dir() / file).is_file(), schema


def test_one_kind_of_rule_set_file_per_folder() -> None:
    folders = [kind.folder for kind in RULESET_KINDS]
    assert len(set(folders)) == len(folders) and "" in folders


def test_a_second_section_under_a_taken_key_is_refused() -> None:
    first = PROJECT_SECTIONS[0]
    register_section(first)  # the same registration again changes nothing
    with pytest.raises(ValueError, match="registered twice"):
        register_section(ProjectSection(first.key, first.schema, lambda project, parsed: []))
