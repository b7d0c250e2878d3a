"""``fiona validate``: check config files and print every problem, one per line.

Errors make the exit status 1. Warnings (``file:line path: warning: ...``) name settings that
load but will not work as meant: the heartbeat's calling AE left off ``allowed_calling_aes``
(its C-ECHO is rejected and ``fiona status`` reports the service unhealthy), a ``folder``
destination whose ``path`` does not exist (yet: transfers wait until it does); they leave the
exit status 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.config.files import key_line
from engine.config.issues import ConfigError, ConfigIssue, format_path
from engine.config.ldap import ldap_unknown_projects, ldap_validate
from engine.config.loader import check_project_files, load_site, project_files
from engine.config.model import ProjectConfig, SiteConfig
from engine.config.pacs import OnGetRefused, RetrieveMethod
from engine.config.rulesets import PROJECT_SUFFIXES, ruleset_files
from engine.config.schema import load_schema
from engine.config.sections import project_sections
from engine.config.sections import ruleset_kind as kind_of_folder

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
    """The checker of a file under ``rulesets/``, by the folder it is in, as registered in
    :mod:`engine.config.sections` (``pixels/``: pixel cleaning rules; ``anonymize/``: the
    generated profile data, checked by the test suite against its generator (None: nothing to
    check here); anything else: a classification rule set).
    """
    return kind_of_folder(_kind_folder(path)).check


def _collect(targets: list[Path]) -> tuple[list[Path], list[Path], list[ConfigIssue]]:
    """(project files, rule set files, issues) named by ``targets`` (files, or folders of
    files; a rule set folder is read recursively), in order, once each."""
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


def _warning(file: Path, keys: tuple[str, ...], message: str) -> ConfigIssue:
    return ConfigIssue(file, key_line(file, keys), format_path(keys), f"warning: {message}")


def _loopback(address: str) -> bool:
    """Whether ``address`` is this machine only (a host name is assumed reachable)."""
    import ipaddress

    try:
        return address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def web_in_clear(site: SiteConfig) -> str | None:
    """Why the web API's tokens would cross the network in clear (enabled, bound beyond
    loopback, no certificate), or None when they would not."""
    web = site.web
    if not web.enabled or _loopback(web.bind) or web.cert_file is not None:
        return None
    return (
        f"the web API listens on {web.bind} over plain HTTP: API tokens cross the network in"
        " clear; set web.cert_file and web.key_file, or keep web.bind 127.0.0.1 behind a"
        " reverse proxy that serves HTTPS"
    )


def status_http_deprecated(site: SiteConfig) -> str | None:
    """How to move off the deprecated ``status_http`` section when it is on, or None."""
    old = site.status_http
    if not old.port:
        return None
    web = site.web
    where = f"web.port, {web.port}" if web.enabled else "web.port, once web.enabled is true"
    return (
        f"status_http is deprecated and goes in the next release: the web portal's port ({where})"
        " answers GET /status.json and GET /metrics without a login, and its dashboard replaces"
        " the page; point Prometheus and monitoring at that port and remove status_http (until"
        f" then port {old.port} still answers /status.json, /metrics and / as plain text)"
    )


def open_to_any_sender(site: SiteConfig) -> str | None:
    """Why the receiver takes images from anyone who can reach it (bound beyond loopback and
    no ``allowed_calling_aes`` list), or None when it does not."""
    address = site.bind_address
    loopback = _loopback(address)
    if loopback or site.allowed_calling_aes:
        return None
    return (
        f"fiona listens on {address} and allowed_calling_aes is empty: any host that reaches the"
        " port can send images under any AE title; list the modalities' AE titles in"
        " allowed_calling_aes and open the port only to their addresses in the firewall"
    )


def site_warnings(site: SiteConfig) -> list[ConfigIssue]:
    """The receiver open to any sender on the network; the web API in clear on the network;
    the deprecated ``status_http`` section; the heartbeat's calling AE not on a set
    ``allowed_calling_aes`` list."""
    found = []
    open_network = open_to_any_sender(site)
    if open_network is not None and site.source is not None:
        found.append(_warning(site.source, ("bind_address",), open_network))
    clear = web_in_clear(site)
    if clear is not None and site.source is not None:
        found.append(_warning(site.source, ("web", "bind"), clear))
    old = status_http_deprecated(site)
    if old is not None and site.source is not None:
        found.append(_warning(site.source, ("status_http",), old))
    return found + _heartbeat_warnings(site) + _pacs_warnings(site)


def _pacs_warnings(site: SiteConfig) -> list[ConfigIssue]:
    """A PACS elsewhere that is to C-MOVE (or may fall back to C-MOVE) to a fiona listening on
    this machine only."""
    if site.source is None or not _loopback(site.bind_address):
        return []
    found = []
    only = f"fiona listens on {site.bind_address} only: set bind_address (and allowed_calling_aes)"
    for n, pacs in enumerate(site.pacs):
        if _loopback(pacs.host):
            continue
        if pacs.retrieve is RetrieveMethod.MOVE:
            key = "retrieve"
            message = (
                f"PACS {pacs.name} is to send C-MOVE results to fiona's port, but {only},"
                " or retrieve: get"
            )
        elif pacs.on_get_refused is OnGetRefused.MOVE:
            key = "on_get_refused"
            message = (
                f"PACS {pacs.name} is to send C-MOVE results to fiona's port when it refuses"
                f" C-GET, but {only}, or on_get_refused: fail"
            )
        else:
            continue
        where = format_path(("pacs", n, key))
        line = key_line(site.source, ("pacs",))
        found.append(ConfigIssue(site.source, line, where, f"warning: {message}"))
    return found


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


def _site_ports(site: SiteConfig) -> dict[int, str]:
    """The TCP ports ``fiona serve`` listens on for the whole run, with their site keys."""
    ports = {site.port: "port (the DICOM receiver)"}
    if site.web.enabled:
        ports.setdefault(site.web.port, "web.port (the web portal)")
    if site.status_http.port:
        ports.setdefault(site.status_http.port, "status_http.port")
    return ports


def port_clashes(site: SiteConfig, project: ProjectConfig) -> list[ConfigIssue]:
    """Errors for each ``dicom`` destination whose ``storage_commitment.port`` is a port the
    site's service already listens on: its report listener could never open."""
    taken = _site_ports(site)
    found = []
    destinations = project.raw.get("destinations", {})
    if not isinstance(destinations, dict):
        return []
    for name, entry in destinations.items():
        commitment = entry.get("storage_commitment") if isinstance(entry, dict) else None
        port = commitment.get("port") if isinstance(commitment, dict) else None
        if not isinstance(port, int) or port not in taken:
            continue
        keys = ("destinations", str(name), "storage_commitment", "port")
        message = (
            f"port {port} is the site's {taken[port]}: fiona could not listen there for the"
            " peer's Storage Commitment report; give the destination a port of its own"
        )
        found.append(
            ConfigIssue(project.source, key_line(project.source, keys), format_path(keys), message)
        )
    return found


def project_checks(project: ProjectConfig) -> tuple[list[ConfigIssue], list[ConfigIssue]]:
    """(errors, warnings) of a loaded project beyond those of loading it: the ``validate`` and
    ``warn`` checks its sections registered (a REDCap token file, a folder destination whose
    ``path`` does not exist)."""
    errors: list[ConfigIssue] = []
    warnings: list[ConfigIssue] = []
    for section in project_sections(load_schema("project")):
        if section.validate is not None:
            errors += section.validate(project)
        if section.warn is not None:
            warnings += section.warn(project)
    return errors, warnings


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
    site: SiteConfig | None = None
    if site_path is not None:
        checked += 1
        try:
            site = load_site(site_path)
        except ConfigError as exc:
            issues += exc.issues
        else:
            default_dir = site.projects_dir
            warnings += site_warnings(site)
            ldap_errors, ldap_warnings = ldap_validate(site)
            issues += ldap_errors
            warnings += ldap_warnings

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
    for project in projects:
        errors, found = project_checks(project)
        issues += errors + ([] if site is None else port_clashes(site, project))
        warnings += found
    if site is not None and [t.resolve() for t in targets] == [site.projects_dir.resolve()]:
        warnings += ldap_unknown_projects(site, {p.name for p in projects})
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
