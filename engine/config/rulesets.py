"""Where rule sets are, and how config files name them.

A reference is either a bare name (``mr``: the file ``rulesets/classify/mr.yaml``, ``.yml`` or
``.json``) or a path, relative to the file that holds the reference. No reference at all means
every rule set in ``rulesets/classify/``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

#: Suffixes of config files: project files, rule sets, profiles (YAML or JSON). Defined here,
#: not in the loader, so reading a rule set does not import the schema machinery.
PROJECT_SUFFIXES = (".yaml", ".yml", ".json")
#: File name endings read as rule set files.
RULESET_SUFFIXES = PROJECT_SUFFIXES
#: Folder beside a rule set holding its golden cases: ``mr.yaml`` -> ``mr.cases/``.
CASES_SUFFIX = ".cases"


def rulesets_dir() -> Path:
    """``$FIONA_RULESETS`` if set (for installed wheels), else ``<repo>/rulesets``."""
    env = os.environ.get("FIONA_RULESETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "rulesets"


def classify_dir() -> Path:
    return rulesets_dir() / "classify"


def is_name(ref: str) -> bool:
    """Whether ``ref`` names a rule set (``mr``) rather than giving a path."""
    return "/" not in ref and "\\" not in ref and "." not in ref


def resolve_ruleset(ref: str, base_dir: Path) -> Path:
    """The file ``ref`` refers to (it may not exist: callers report that)."""
    if not is_name(ref):
        path = Path(ref).expanduser()
        return path if path.is_absolute() else base_dir / path
    for suffix in PROJECT_SUFFIXES:
        candidate = classify_dir() / f"{ref}{suffix}"
        if candidate.is_file():
            return candidate
    return classify_dir() / f"{ref}.yaml"


def resolve_rulesets(refs: Sequence[str], base_dir: Path) -> list[Path]:
    """Files for ``refs``; with none, every rule set in ``rulesets/classify/``."""
    if refs:
        return [resolve_ruleset(ref, base_dir) for ref in refs]
    return ruleset_files(classify_dir())


def ruleset_files(folder: Path) -> list[Path]:
    """Rule set files under ``folder``, recursively, sorted: ``*.yaml``, ``*.yml``, ``*.json``
    outside ``*.cases`` folders; hidden and ``_*`` files and folders are skipped."""
    found = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(p.startswith((".", "_")) or p.endswith(CASES_SUFFIX) for p in parts[:-1]):
            continue
        if path.name.startswith((".", "_")) or path.suffix.lower() not in RULESET_SUFFIXES:
            continue
        if path.is_file():
            found.append(path)
    return found
