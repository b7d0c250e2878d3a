"""Load and validate site and project files into the frozen dataclasses of :mod:`.model`.

Validation runs in layers and collects every problem instead of stopping at the first:

1. parse: YAML (JSON is read by the same loader, so it gets line numbers too); duplicate keys
   are errors;
2. schema: the JSON Schemas in ``schemas/`` (every error, each with the line of its key);
3. cross-field checks the schema cannot express: TLS files and unique project names here, and
   for each project section another layer owns (routing, pipeline, destinations, ...) the
   checker it registered in :mod:`engine.config.sections`.

Reading files is :mod:`.files`, schemas and their messages :mod:`.schema`. Each problem is a
:class:`ConfigIssue` (``file:line path: message``) with a message that says what was expected
and what was found.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from engine.config.files import (
    MAX_CONFIG_ALIASES,
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_NODES,
    ConfigTooBig,
    LineLoader,
    ParsedFile,
    parse_file,
)
from engine.config.issues import (
    COMMAND_LINE,
    ConfigError,
    ConfigIssue,
    JsonPath,
    format_path,
    found_value,
    issue_order,
)
from engine.config.ldap import ldap_config, ldap_issues
from engine.config.model import (
    AmbiguousPolicy,
    DeidSettings,
    DuplicatePolicy,
    HeartbeatConfig,
    Limits,
    LogFile,
    NodeConfig,
    ProjectConfig,
    RetentionPolicy,
    RoutingPolicy,
    SiteConfig,
    StatusHttp,
    Timeouts,
    TlsConfig,
    UnroutedPolicy,
    WebConfig,
)
from engine.config.pacs import pacs_entries, pacs_issues
from engine.config.rulesets import PROJECT_SUFFIXES, rulesets_dir
from engine.config.schema import apply_defaults, load_schema, schema_dir, schema_issues
from engine.config.sections import project_sections

__all__ = [  # the names of engine.config.issues and .files are here for callers' convenience
    "COMMAND_LINE",
    "MAX_CONFIG_ALIASES",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_NODES",
    "PROJECT_SUFFIXES",
    "ConfigError",
    "ConfigIssue",
    "ConfigTooBig",
    "JsonPath",
    "LineLoader",
    "check_project_files",
    "check_site",
    "find_site_config",
    "format_path",
    "load_project",
    "load_projects",
    "load_site",
    "project_files",
    "schema_dir",
]


def _schema_issues(
    parsed: ParsedFile, doc: object, schema: Mapping[str, Any], blame: Mapping[str, Path]
) -> list[ConfigIssue]:
    """Every schema error in ``doc`` as issues sorted by line.

    ``blame`` maps top-level keys that did not come from the file (overrides) to the
    ``file`` their issues are reported against.
    """
    issues = schema_issues(doc, schema, parsed.file, parsed.line_of, blame=blame)
    issues.sort(key=issue_order)
    return issues


# --------------------------------------------------------------------------- site


def _site_issues(
    path: Path | None, overrides: Mapping[str, object] | None
) -> tuple[SiteConfig | None, list[ConfigIssue]]:
    schema = load_schema("site")
    if path is None:
        parsed = ParsedFile(COMMAND_LINE, {}, {}, [])
    else:
        parsed = parse_file(path)
        if parsed.data is None and parsed.issues:
            return None, parsed.issues
    issues = list(parsed.issues)
    from_file: dict[str, Any]
    if parsed.data is None:
        from_file = {}
    elif isinstance(parsed.data, dict):
        from_file = copy.deepcopy(parsed.data)
    else:
        issues.append(
            ConfigIssue(parsed.file, None, "(root)", f"expected object, {found_value(parsed.data)}")
        )
        return None, issues

    doc = dict(from_file)
    blame: dict[str, Path] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        value = str(value) if isinstance(value, Path) else value
        section, _, inner = key.partition(".")
        if inner:  # a key inside a section (``web.port``): the rest of the section stays
            found = doc.get(section)
            doc[section] = {**(found if isinstance(found, dict) else {}), inner: value}
        else:
            doc[key] = value
            blame[key] = COMMAND_LINE
    schema_issues = _schema_issues(parsed, doc, schema, blame)
    issues = sorted(issues + schema_issues, key=issue_order)
    if schema_issues:
        return None, issues

    apply_defaults(schema, doc, schema)
    base = path.parent if path is not None else None

    def file_path(key: str, value: str) -> Path:
        p = Path(value).expanduser()
        in_file = key in from_file and key not in blame
        return base / p if base is not None and in_file and not p.is_absolute() else p

    tls_doc = doc["tls"]

    def tls_path(key: str, section: str = "tls") -> Path | None:
        value = doc[section][key]
        if value is None:
            return None
        p = Path(value).expanduser()
        in_file = from_file.get(section, {}) if section not in blame else {}
        return base / p if base is not None and key in in_file and not p.is_absolute() else p

    index_url = doc["index_url"]
    prefix = "sqlite:///"
    if index_url.startswith(prefix) and "index_url" not in blame:
        index_url = prefix + str(file_path("index_url", index_url[len(prefix) :]))

    site = SiteConfig(
        source=path,
        ae_title=doc["ae_title"],
        port=int(doc["port"]),
        bind_address=doc["bind_address"],
        reuse_port=bool(doc["reuse_port"]),
        data_dir=file_path("data_dir", doc["data_dir"]),
        projects_dir=file_path("projects_dir", doc["projects_dir"]),
        index_url=index_url,
        allowed_calling_aes=tuple(doc["allowed_calling_aes"]),
        max_pdu=int(doc["max_pdu"]),
        duplicate_policy=DuplicatePolicy(doc["duplicate_policy"]),
        limits=Limits(
            min_free_disk_mb=int(doc["limits"]["min_free_disk_mb"]),
            max_instance_mb=int(doc["limits"]["max_instance_mb"]),
            max_associations=int(doc["limits"]["max_associations"]),
            max_associations_per_peer=int(doc["limits"]["max_associations_per_peer"]),
        ),
        timeouts=Timeouts(
            acse=float(doc["timeouts"]["acse"]),
            dimse=float(doc["timeouts"]["dimse"]),
            network=float(doc["timeouts"]["network"]),
        ),
        tls=TlsConfig(
            enabled=bool(tls_doc["enabled"]),
            cert_file=tls_path("cert_file"),
            key_file=tls_path("key_file"),
            ca_file=tls_path("ca_file"),
            require_client_cert=bool(tls_doc["require_client_cert"]),
        ),
        routing=RoutingPolicy(
            unrouted=UnroutedPolicy(doc["routing"]["unrouted"]),
            ambiguous=AmbiguousPolicy(doc["routing"]["ambiguous"]),
            unrouted_after=float(doc["routing"]["unrouted_after_seconds"]),
            classify_rulesets=tuple(doc["routing"]["classify_rulesets"]),
        ),
        scan_interval=float(doc["scan_interval_seconds"]),
        log_level=doc["log_level"],
        log_file=_log_file(doc["log_file"], from_file.get("log_file"), base),
        heartbeat=_heartbeat(doc["heartbeat"]),
        node=NodeConfig(
            name=doc["node"]["name"], lease_seconds=float(doc["node"]["lease_seconds"])
        ),
        retention=RetentionPolicy(
            interval=float(doc["retention"]["interval_seconds"]),
            min_free_percent=float(doc["retention"]["min_free_percent"]),
        ),
        deidentification=DeidSettings(
            date_languages=tuple(doc["deidentification"]["date_languages"])
        ),
        status_http=StatusHttp(
            port=int(doc["status_http"]["port"]), bind=str(doc["status_http"]["bind"])
        ),
        web=WebConfig(
            enabled=bool(doc["web"]["enabled"]),
            port=int(doc["web"]["port"]),
            bind=str(doc["web"]["bind"]),
            cert_file=tls_path("cert_file", "web"),
            key_file=tls_path("key_file", "web"),
            session_idle_minutes=float(doc["web"]["session_idle_minutes"]),
            session_max_hours=float(doc["web"]["session_max_hours"]),
            upload_max_mb=float(doc["web"]["upload_max_mb"]),
            trusted_proxies=tuple(doc["web"]["trusted_proxies"]),
            ldap=ldap_config(doc["web"]["ldap"], base if "web" not in blame else None),
        ),
        pacs=pacs_entries(doc["pacs"], lambda value: _written_path(value, base)),
    )
    checks = _check_tls(site.tls, parsed) + _check_web(site.web, parsed)
    checks += _check_date_languages(site.deidentification, parsed)
    checks += ldap_issues(site.web.ldap, parsed)
    checks += pacs_issues(site.pacs, parsed.file, parsed.line_of)
    issues += sorted(checks, key=issue_order)
    return (None if issues else site), issues


def _written_path(value: str, base: Path | None) -> Path:
    """A path written in the site file: relative to the file's folder."""
    p = Path(value).expanduser()
    return base / p if base is not None and not p.is_absolute() else p


def _log_file(doc: Mapping[str, Any], in_file: object, base: Path | None) -> LogFile:
    """The ``log_file`` section (defaults applied); a relative path written in the site file
    is relative to the file's folder."""
    path = None if doc["path"] is None else Path(doc["path"]).expanduser()
    written = isinstance(in_file, Mapping) and "path" in in_file
    if path is not None and base is not None and written and not path.is_absolute():
        path = base / path
    return LogFile(path=path, max_mb=float(doc["max_mb"]), backups=int(doc["backups"]))


def _heartbeat(doc: Mapping[str, Any]) -> HeartbeatConfig:
    """The ``heartbeat`` section (defaults applied) as its dataclass."""
    return HeartbeatConfig(
        interval=float(doc["interval_seconds"]),
        keep=int(doc["keep"]),
        echo_timeout=float(doc["echo_timeout_seconds"]),
        calling_ae=doc["calling_ae"],
        url=doc["url"],
        url_timeout=float(doc["url_timeout_seconds"]),
    )


def _check_web(web: WebConfig, parsed: ParsedFile) -> list[ConfigIssue]:
    """HTTPS needs both a certificate and a key, and both must exist; a trusted proxy is an
    address or a network."""
    bad = [
        ConfigIssue(
            parsed.file,
            parsed.line_of(("web", "trusted_proxies", i)),
            f"web.trusted_proxies[{i}]",
            f"expected an IP address or network (e.g. 10.0.0.0/8), found {p!r}",
        )
        for i, p in enumerate(web.trusted_proxies)
        if not _is_network(p)
    ]
    return bad + _check_web_tls(web, parsed)


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _check_web_tls(web: WebConfig, parsed: ParsedFile) -> list[ConfigIssue]:
    files = {"cert_file": web.cert_file, "key_file": web.key_file}
    given = [k for k, v in files.items() if v is not None]
    if len(given) == 1:
        missing = "key_file" if given == ["cert_file"] else "cert_file"
        line = parsed.line_of(("web", given[0]))
        return [ConfigIssue(parsed.file, line, "web", f"{given[0]} is set but {missing} is not")]
    return [
        ConfigIssue(parsed.file, parsed.line_of(("web", k)), f"web.{k}", f"no such file: {v}")
        for k, v in files.items()
        if v is not None and not v.is_file()
    ]


def _check_date_languages(deid: DeidSettings, parsed: ParsedFile) -> list[ConfigIssue]:
    """Each language must be one of ``rulesets/anonymize/month_names.json``."""
    if not deid.date_languages:
        return []  # the table is read only when a site lists languages
    table = rulesets_dir() / "anonymize" / "month_names.json"
    known = sorted(json.loads(table.read_text("utf-8"))["languages"])
    issues = []
    for i, code in enumerate(deid.date_languages):
        if code not in known:
            keys = ("deidentification", "date_languages", i)
            message = f"unknown language {code!r}: one of {', '.join(known)} (or add it to {table})"
            issues.append(
                ConfigIssue(parsed.file, parsed.line_of(keys), format_path(keys), message)
            )
    return issues


def _check_tls(tls: TlsConfig, parsed: ParsedFile) -> list[ConfigIssue]:
    """TLS needs a certificate and key that exist (and a CA to verify required client certs)."""
    if not tls.enabled:
        return []
    issues = []
    line = parsed.line_of(("tls", "enabled"))
    for key in ("cert_file", "key_file"):
        if getattr(tls, key) is None:
            issues.append(
                ConfigIssue(parsed.file, line, "tls", f"TLS is enabled but {key} is not set")
            )
    if tls.require_client_cert and tls.ca_file is None:
        issues.append(
            ConfigIssue(
                parsed.file,
                parsed.line_of(("tls", "require_client_cert")),
                "tls",
                "require_client_cert is true but ca_file is not set (needed to check clients)",
            )
        )
    for key in ("cert_file", "key_file", "ca_file"):
        file = getattr(tls, key)
        if file is not None and not file.is_file():
            issues.append(
                ConfigIssue(
                    parsed.file,
                    parsed.line_of(("tls", key)),
                    f"tls.{key}",
                    f"file not found: {file}",
                )
            )
    return issues


#: The site config read when neither ``--config`` nor ``$FIONA_CONFIG`` names one and this
#: file exists (a module constant so tests can point it elsewhere).
SYSTEM_SITE_CONFIG = Path("/etc/fiona/site.yaml")
#: The environment variable naming the site config.
CONFIG_ENV = "FIONA_CONFIG"


def find_site_config(explicit: Path | None) -> Path | None:
    """The site config file every command reads: ``explicit`` (``--config``), else
    ``$FIONA_CONFIG`` (when set and not empty), else :data:`SYSTEM_SITE_CONFIG` when it
    exists, else None (the embedded defaults)."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get(CONFIG_ENV, "").strip()
    if from_env:
        return Path(from_env)
    return SYSTEM_SITE_CONFIG if SYSTEM_SITE_CONFIG.is_file() else None


def load_site(path: Path | None, overrides: Mapping[str, object] | None = None) -> SiteConfig:
    """The site config from ``path`` (None: the embedded defaults) with ``overrides`` applied.

    ``overrides`` are command-line values keyed like the file (``port``, ``ae_title``,
    ``data_dir``, ``projects_dir``, ``bind_address``; None values are ignored); they replace
    the file's values and are validated with them (their issues name ``(command line)``).
    Relative paths written in the file are relative to the file's folder; defaults and
    overrides are relative to the current directory. Raises :class:`ConfigError` with every
    problem found.
    """
    site, issues = _site_issues(path, overrides)
    if issues or site is None:
        raise ConfigError(issues)
    return site


def check_site(path: Path | None) -> list[ConfigIssue]:
    """Every problem in the site file ``path`` (empty when it loads)."""
    return _site_issues(path, None)[1]


# --------------------------------------------------------------------------- projects


def _project_issues(path: Path) -> tuple[ProjectConfig | None, list[ConfigIssue], int | None]:
    """(project or None, issues, line of its ``name`` key)."""
    schema = load_schema("project")
    parsed = parse_file(path)
    if parsed.data is None and parsed.issues:
        return None, parsed.issues, None
    data = {} if parsed.data is None else parsed.data
    issues = list(parsed.issues)
    if not isinstance(data, dict):
        issues.append(ConfigIssue(path, None, "(root)", f"expected object, {found_value(data)}"))
        return None, issues, None
    doc = copy.deepcopy(data)
    issues = sorted(issues + _schema_issues(parsed, doc, schema, {}), key=issue_order)
    if issues:
        return None, issues, None
    apply_defaults(schema, doc, schema)
    project = ProjectConfig(
        name=doc["name"],
        source=path,
        description=doc["description"],
        enabled=bool(doc["enabled"]),
        raw=doc,
    )
    issues = sorted(_project_semantic_issues(project, parsed), key=issue_order)
    if issues:
        return None, issues, None
    return project, [], parsed.line_of(("name",))


def _project_semantic_issues(project: ProjectConfig, parsed: ParsedFile) -> list[ConfigIssue]:
    """The cross-field checks of the sections other layers own (routing, pipeline,
    destinations, ...), as registered in :mod:`engine.config.sections`."""
    issues: list[ConfigIssue] = []
    for section in project_sections(load_schema("project")):
        issues += section.check(project, parsed)
    return issues


def load_project(path: Path) -> ProjectConfig:
    """One project file; raises :class:`ConfigError` with every problem found."""
    project, issues, _ = _project_issues(path)
    if issues or project is None:
        raise ConfigError(issues)
    return project


def project_files(folder: Path) -> list[Path]:
    """Project files in ``folder``, sorted; hidden files and ``_*`` files are skipped."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in PROJECT_SUFFIXES
        and not p.name.startswith((".", "_"))
        and p.is_file()
    )


def check_project_files(files: Iterable[Path]) -> tuple[list[ProjectConfig], list[ConfigIssue]]:
    """Load ``files`` in order; a name already taken by an earlier file is an issue."""
    projects: list[ProjectConfig] = []
    issues: list[ConfigIssue] = []
    owner: dict[str, Path] = {}
    for file in files:
        project, found, name_line = _project_issues(file)
        issues += found
        if project is None:
            continue
        if project.name in owner:
            message = f"project name '{project.name}' is already used by {owner[project.name]}"
            issues.append(ConfigIssue(file, name_line, "name", message))
            continue
        owner[project.name] = file
        projects.append(project)
    return projects, issues


def load_projects(projects_dir: Path) -> tuple[list[ProjectConfig], list[ConfigIssue]]:
    """Every valid project in ``projects_dir`` and the issues of the ones left out.

    Reads ``*.yaml``, ``*.yml`` and ``*.json`` in name order (not hidden, not ``_*``). A
    project with any issue is left out; when two files use one name, the first keeps it. A
    missing folder is one issue.
    """
    if not projects_dir.is_dir():
        what = "is not a folder" if projects_dir.exists() else "does not exist"
        return [], [ConfigIssue(projects_dir, None, "(root)", f"projects folder {what}")]
    return check_project_files(project_files(projects_dir))
