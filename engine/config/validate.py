"""``fiona validate``: check config files and print every problem, one per line."""

from __future__ import annotations

from pathlib import Path

from engine.config.loader import (
    PROJECT_SUFFIXES,
    ConfigIssue,
    check_project_files,
    format_path,
    load_site,
    project_files,
)
from engine.config.loader import ConfigError as _ConfigError

DEFAULT_PROJECTS_DIR = Path("projects")


def _collect(targets: list[Path]) -> tuple[list[Path], list[ConfigIssue]]:
    """Project files named by ``targets`` (files, or folders of files), in order, once each."""
    files: list[Path] = []
    issues: list[ConfigIssue] = []
    for target in targets:
        if target.is_dir():
            found = project_files(target)
        elif target.is_file():
            found = [target]
        else:
            issues.append(ConfigIssue(target, None, format_path(()), "no such file or folder"))
            continue
        files += [f for f in found if f not in files]
    return files, issues


def run_validate(
    paths: list[Path], site_path: Path | None = None, projects_dir: Path | None = None
) -> int:
    """Check the site file (if given) and project files; print issues and a summary.

    ``paths`` are project files or folders of them, checked together with ``projects_dir``;
    with neither, the site's ``projects_dir`` (when a valid site file is given) or
    ``projects/``. Project names must be unique across everything checked. Returns 1 if any
    problem was found, else 0.
    """
    issues: list[ConfigIssue] = []
    checked = 0
    default_dir = DEFAULT_PROJECTS_DIR
    if site_path is not None:
        checked += 1
        try:
            default_dir = load_site(site_path).projects_dir
        except _ConfigError as exc:
            issues += exc.issues

    targets = list(paths) + ([projects_dir] if projects_dir is not None else [])
    if not targets:
        targets = [default_dir]
    files, missing = _collect(targets)
    issues += missing
    for target in targets:
        if target.is_file() and target.suffix.lower() not in PROJECT_SUFFIXES:
            message = f"not a project file (expected {', '.join(PROJECT_SUFFIXES)})"
            issues.append(ConfigIssue(target, None, format_path(()), message))
    _, project_issues = check_project_files(files)
    issues += project_issues
    checked += len(files)

    for issue in issues:
        print(issue)
    files_word = "file" if checked == 1 else "files"
    errors_word = "error" if len(issues) == 1 else "errors"
    print(f"{checked} {files_word} checked, {len(issues)} {errors_word}")
    return 1 if issues else 0
