"""``fiona validate``: check config files and print every problem, one per line.

Errors make the exit status 1. Warnings (``file:line path: warning: ...``) name settings that
load but will not work as meant: the heartbeat's calling AE left off ``allowed_calling_aes``
(its C-ECHO is rejected and ``fiona status`` reports the service unhealthy), a ``folder``
destination whose ``path`` does not exist (yet: transfers wait until it does); they leave the
exit status 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
from engine.config.model import ProjectConfig, SiteConfig

DEFAULT_PROJECTS_DIR = Path("projects")
#: A file or folder with a folder of this name in its path holds rule sets, not projects.
RULESETS_FOLDER = "rulesets"


def is_ruleset_path(path: Path) -> bool:
    """Whether ``path`` is under a ``rulesets/`` folder (judged on its path relative to the
    current folder when it is inside it, else on the path as given)."""
    try:
        parts = path.resolve().relative_to(Path.cwd().resolve()).parts
    except ValueError:
        parts = path.parts
    return RULESETS_FOLDER in parts


def _kind_folder(path: Path) -> str:
    """The folder right under the last ``rulesets/`` of ``path`` ('' when there is none)."""
    parts = path.resolve().parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == RULESETS_FOLDER:
            return parts[i + 1] if i + 2 < len(parts) else ""
    return ""


def ruleset_kind(path: Path) -> Callable[[Path], list[ConfigIssue]] | None:
    """The checker of a file under ``rulesets/``, by the folder it is in.

    ``pixels/``: pixel cleaning rules; ``anonymize/``: the generated profile data, checked by
    the test suite against its generator (None: nothing to check here); anything else: a
    classification rule set.
    """
    folder = _kind_folder(path)
    if folder == "anonymize":
        return None
    if folder == "pixels":
        from engine.deid.pixels import check_pixel_rules

        return lambda p: check_pixel_rules([p])[1]
    from engine.rules import check_ruleset

    return check_ruleset


def _collect(targets: list[Path]) -> tuple[list[Path], list[Path], list[ConfigIssue]]:
    """(project files, rule set files, issues) named by ``targets`` (files, or folders of
    files; a rule set folder is read recursively), in order, once each."""
    from engine.rules import ruleset_files  # the rules package builds on config

    files: list[Path] = []
    rulesets: list[Path] = []
    issues: list[ConfigIssue] = []
    for target in targets:
        if target.is_dir():
            ruleset = is_ruleset_path(target)
            found = ruleset_files(target) if ruleset else project_files(target)
        elif target.is_file():
            ruleset = is_ruleset_path(target)
            found = [target]
        else:
            issues.append(ConfigIssue(target, None, format_path(()), "no such file or folder"))
            continue
        into = rulesets if ruleset else files
        into += [f for f in found if f not in into]
    return files, rulesets, issues


def _key_line(file: Path, keys: Iterable[str]) -> int | None:
    """The line of the mapping key at ``keys`` in a YAML file that already loaded (or of its
    nearest parent key); None when it cannot be found (JSON on one line, say)."""
    import yaml

    try:
        node = yaml.compose(file.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        found = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key]
        if not found:
            break
        line, node = found[0][0].start_mark.line + 1, found[0][1]
    return line


def _warning(file: Path, keys: tuple[str, ...], message: str) -> ConfigIssue:
    return ConfigIssue(file, _key_line(file, keys), format_path(keys), f"warning: {message}")


def open_to_any_sender(site: SiteConfig) -> str | None:
    """Why the receiver takes images from anyone who can reach it (bound beyond loopback and
    no ``allowed_calling_aes`` list), or None when it does not."""
    import ipaddress

    address = site.bind_address
    try:
        loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False  # a host name: assume it is reachable from the network
    if loopback or site.allowed_calling_aes:
        return None
    return (
        f"fiona listens on {address} and allowed_calling_aes is empty: any host that reaches the"
        " port can send images under any AE title; list the modalities' AE titles in"
        " allowed_calling_aes and open the port only to their addresses in the firewall"
    )


def site_warnings(site: SiteConfig) -> list[ConfigIssue]:
    """The receiver open to any sender on the network; the heartbeat's calling AE not on a
    set ``allowed_calling_aes`` list."""
    found = []
    open_network = open_to_any_sender(site)
    if open_network is not None and site.source is not None:
        found.append(_warning(site.source, ("bind_address",), open_network))
    return found + _heartbeat_warnings(site)


def _heartbeat_warnings(site: SiteConfig) -> list[ConfigIssue]:
    allowed = site.allowed_calling_aes
    calling = site.heartbeat.calling_ae or site.ae_title
    if site.source is None or not allowed or calling in allowed:
        return []
    which = "heartbeat.calling_ae"
    if not site.heartbeat.calling_ae:
        which = "ae_title, as heartbeat.calling_ae is not set"
    message = (
        f"the heartbeat's C-ECHO calls with AE '{calling}' ({which}), which is not on this list:"
        " it is rejected and `fiona status` reports the service unhealthy; add it to the list or"
        " set heartbeat.calling_ae to one on it"
    )
    return [_warning(site.source, ("allowed_calling_aes",), message)]


def project_warnings(project: ProjectConfig) -> list[ConfigIssue]:
    """Each ``folder`` destination whose ``path`` does not exist (not created, not mounted)."""
    destinations = project.raw.get("destinations")
    if not isinstance(destinations, dict):
        return []
    found = []
    for name, entry in destinations.items():
        if not isinstance(entry, dict) or entry.get("type") != "folder" or "path" not in entry:
            continue
        root = Path(str(entry["path"])).expanduser()  # relative to the project file's folder
        root = root if root.is_absolute() else project.source.parent / root
        if not root.exists():
            message = (
                f"the folder {root} does not exist (not created, or not mounted);"
                " transfers to it wait and retry until it does"
            )
            found.append(_warning(project.source, ("destinations", str(name), "path"), message))
    return found


def run_validate(
    paths: list[Path], site_path: Path | None = None, projects_dir: Path | None = None
) -> int:
    """Check the site file (if given) and project files; print issues and a summary.

    ``paths`` are project files or folders of them, checked together with ``projects_dir``;
    with neither, the site's ``projects_dir`` (when a valid site file is given) or
    ``projects/``. Project names must be unique across everything checked. Paths under a
    ``rulesets/`` folder are rule set files (a folder: every one under it, recursively),
    checked with :func:`engine.rules.check_ruleset`. Returns 1 if any problem was found,
    else 0.
    """
    issues: list[ConfigIssue] = []
    warnings: list[ConfigIssue] = []
    checked = 0
    default_dir = DEFAULT_PROJECTS_DIR
    if site_path is not None:
        checked += 1
        try:
            site = load_site(site_path)
        except _ConfigError as exc:
            issues += exc.issues
        else:
            default_dir = site.projects_dir
            warnings += site_warnings(site)

    targets = list(paths) + ([projects_dir] if projects_dir is not None else [])
    if not targets:
        targets = [default_dir]
    files, rulesets, missing = _collect(targets)
    issues += missing
    for target in targets:
        if target.is_file() and target.suffix.lower() not in PROJECT_SUFFIXES:
            what = "rule set" if is_ruleset_path(target) else "project"
            message = f"not a {what} file (expected {', '.join(PROJECT_SUFFIXES)})"
            issues.append(ConfigIssue(target, None, format_path(()), message))
    projects, project_issues = check_project_files(files)
    issues += project_issues
    from engine.redcap.settings import token_file_issues  # builds on config: import late

    for project in projects:
        issues += token_file_issues(project)
        warnings += project_warnings(project)
    checked += len(files)
    for ruleset in rulesets:
        kind = ruleset_kind(ruleset)
        if kind is not None:
            issues += kind(ruleset)
            checked += 1

    for issue in [*issues, *warnings]:
        print(issue)
    files_word = "file" if checked == 1 else "files"
    errors_word = "error" if len(issues) == 1 else "errors"
    summary = f"{checked} {files_word} checked, {len(issues)} {errors_word}"
    if warnings:
        summary += f", {len(warnings)} warning" + ("" if len(warnings) == 1 else "s")
    print(summary)
    return 1 if issues else 0
