"""Load and validate site and project files into the frozen dataclasses of :mod:`.model`.

Validation runs in layers and collects every problem instead of stopping at the first:

1. parse: YAML (JSON is read by the same loader, so it gets line numbers too); duplicate keys
   are errors;
2. schema: the JSON Schemas in ``schemas/`` (every error, each with the line of its key);
3. cross-field checks the schema cannot express (TLS files, unique project names).

Each problem is a :class:`ConfigIssue` (``file:line path: message``) with a message that says
what was expected and what was found.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from engine.config.model import (
    AmbiguousPolicy,
    DuplicatePolicy,
    HeartbeatConfig,
    Limits,
    LogFile,
    ProjectConfig,
    RetentionPolicy,
    RoutingPolicy,
    SiteConfig,
    StatusHttp,
    Timeouts,
    TlsConfig,
    UnroutedPolicy,
)
from engine.config.rulesets import PROJECT_SUFFIXES

__all__ = [
    "COMMAND_LINE",
    "PROJECT_SUFFIXES",
    "ConfigError",
    "ConfigIssue",
    "ConfigTooBig",
    "LineLoader",
    "find_site_config",
    "load_project",
    "load_projects",
    "load_site",
    "project_files",
    "schema_dir",
]

#: ``ConfigIssue.file`` of a problem in a command-line override (``--port 0``).
COMMAND_LINE = Path("(command line)")
#: File name endings read as project files.

JsonPath = tuple[str | int, ...]


# --------------------------------------------------------------------------- issues


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in one config file: where it is and what to do about it."""

    file: Path
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = str(self.file) if self.line is None else f"{self.file}:{self.line}"
        return f"{where} {self.path}: {self.message}"


class ConfigError(Exception):
    """A config file (or override) is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: list[ConfigIssue] = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    def __str__(self) -> str:
        return "\n".join(str(i) for i in self.issues)


def format_path(path: Iterable[str | int]) -> str:
    """``('limits', 'max_pdu')`` -> ``limits.max_pdu``; ``('d', 0)`` -> ``d[0]``; () -> (root)."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


# --------------------------------------------------------------------------- YAML with lines


@dataclass(frozen=True)
class _Duplicate:
    path: JsonPath
    key: str
    line: int
    first_line: int


#: Bounds on one config file, so a hostile or broken file is refused at once instead of
#: exhausting memory (a "billion laughs" alias bomb) or the stack (``[[[[...``): its size in
#: bytes, its values counted with every alias expanded, its aliases, and its nesting depth.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_CONFIG_NODES = 250_000
MAX_CONFIG_ALIASES = 10_000
MAX_CONFIG_DEPTH = 100


class ConfigTooBig(yaml.YAMLError):
    """A config file past one of the bounds above; ``mark`` is where it was noticed."""

    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class LineLoader(yaml.SafeLoader):
    """A safe YAML loader that remembers where things are, within bounds.

    After :meth:`load_document`, ``lines`` maps the path of every mapping key and sequence item
    (``('limits', 'max_pdu')``, ``('items', 0)``) to its 1-based line, and ``duplicates`` lists
    keys defined twice in one mapping (the later value wins in the data; they are errors).

    While composing, it counts values as they would be with every alias expanded, aliases and
    the nesting depth, and raises :class:`ConfigTooBig` past :data:`MAX_CONFIG_NODES`,
    :data:`MAX_CONFIG_ALIASES` or :data:`MAX_CONFIG_DEPTH`; an alias to a value that contains
    it is refused too. The count is kept per node, so this costs one pass over the text.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.lines: dict[JsonPath, int] = {}
        self.duplicates: list[_Duplicate] = []
        self._sizes: dict[int, int] = {}  # id(node) -> values in it, aliases expanded
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            self._aliases += 1
            if self._aliases > MAX_CONFIG_ALIASES:
                raise ConfigTooBig(f"more than {MAX_CONFIG_ALIASES} aliases (*name)", mark)
            if id(node) not in self._sizes:
                raise ConfigTooBig("an alias refers to a value that contains it", mark)
            return node
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise ConfigTooBig(f"nested deeper than {MAX_CONFIG_DEPTH} levels", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None:
            self._count(node)
        return node

    def _count(self, node: yaml.Node) -> None:
        """Record the values in ``node`` (its children are counted already)."""
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes[id(item)] for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        if size > MAX_CONFIG_NODES:
            raise ConfigTooBig(
                f"more than {MAX_CONFIG_NODES} values once its aliases are expanded"
                " (an alias bomb?)",
                node.start_mark,
            )
        self._sizes[id(node)] = size

    def load_document(self) -> object:
        """The single document in the stream (None when empty), recording lines on the way."""
        node = self.get_single_node()
        if node is None:
            return None
        self._walk(node, (), set())
        return self.construct_document(node)

    def _walk(self, node: yaml.Node, path: JsonPath, active: set[int]) -> None:
        if id(node) in active:  # a recursive alias: nothing new below
            return
        active = active | {id(node)}
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                if isinstance(key_node, yaml.ScalarNode):
                    key = str(self.construct_object(key_node))
                else:
                    key = "?"  # a complex key: the constructor rejects it anyway
                line = key_node.start_mark.line + 1
                if key in first:
                    self.duplicates.append(_Duplicate(path, key, line, first[key]))
                else:
                    first[key] = line
                    self.lines[(*path, key)] = line
                self._walk(value_node, (*path, key), active)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[(*path, index)] = item.start_mark.line + 1
                self._walk(item, (*path, index), active)


@dataclass
class _Parsed:
    file: Path
    data: object
    lines: dict[JsonPath, int]
    issues: list[ConfigIssue]

    def line_of(self, path: Iterable[object]) -> int | None:
        """Line of ``path``'s key, else of its nearest parent with one (None for the root)."""
        parts = _norm(path)
        while parts:
            if parts in self.lines:
                return self.lines[parts]
            parts = parts[:-1]
        return None


def _norm(path: Iterable[object]) -> JsonPath:
    return tuple(p if isinstance(p, int) and not isinstance(p, bool) else str(p) for p in path)


_YAML_HINTS = {
    "mapping values are not allowed here": "check the indentation, and quote values holding ': '",
    "found character '\\t'": "indent with spaces, not tabs",
    "end of stream": "a quote or bracket is not closed",
    "<stream end>": "a quote or bracket is not closed",
}


def _failed(file: Path, line: int | None, message: str) -> _Parsed:
    return _Parsed(file, None, {}, [ConfigIssue(file, line, "(root)", message)])


def _parse(file: Path) -> _Parsed:
    """Read ``file`` as YAML; syntax errors and duplicate keys become issues."""
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            limit = MAX_CONFIG_BYTES // (1024 * 1024)
            message = f"{size} bytes is too big for a config file (at most {limit} MiB)"
            return _failed(file, None, message)
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return _failed(file, None, f"not UTF-8 text: {exc}")
    except OSError as exc:
        return _failed(file, None, f"cannot read: {exc.strerror or exc}")
    loader = LineLoader(text)
    try:
        data = loader.load_document()
    except ConfigTooBig as exc:
        line = exc.mark.line + 1 if exc.mark is not None else None
        return _failed(file, line, f"refused: {exc.message}")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at_end = any(end in (exc.problem or "") for end in ("end of stream", "<stream end>"))
        if exc.context_mark is not None and at_end:
            mark = exc.context_mark  # the file's end says little; point at what is unclosed
        line = mark.line + 1 if mark is not None else None
        message = "YAML syntax error: " + (exc.problem or "cannot parse")
        if exc.context:
            message += f" ({exc.context}"
            if exc.context_mark is not None and exc.context_mark is not mark:
                message += f" on line {exc.context_mark.line + 1}"
            message += ")"
        for problem, hint in _YAML_HINTS.items():
            if problem in message:
                message += f"; {hint}"
        return _failed(file, line, message)
    except yaml.YAMLError as exc:
        return _failed(file, None, f"YAML error: {exc}")
    finally:
        loader.dispose()
    issues = [
        ConfigIssue(
            file,
            d.line,
            format_path(d.path),
            f"duplicate key '{d.key}' (first defined on line {d.first_line})",
        )
        for d in loader.duplicates
    ]
    return _Parsed(file, data, loader.lines, issues)


# --------------------------------------------------------------------------- schemas


def schema_dir() -> Path:
    """Folder holding ``site.schema.json`` and ``project.schema.json``.

    ``$FIONA_SCHEMAS`` if set (for installed wheels), else ``<repo>/schemas``.
    """
    env = os.environ.get("FIONA_SCHEMAS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "schemas"


@functools.cache
def _schema(name: str, folder: Path) -> dict[str, Any]:
    file = folder / f"{name}.schema.json"
    try:
        loaded = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"config schema not found: {file} (set FIONA_SCHEMAS to the schemas/ folder)"
        ) from None
    return cast(dict[str, Any], loaded)


def _load_schema(name: str) -> dict[str, Any]:
    return _schema(name, schema_dir())


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` with a local ``$ref`` (``#/$defs/x``) merged in; its own keys win."""
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return dict(schema)
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part]
    merged = _resolve(target, root)
    merged.update({k: v for k, v in schema.items() if k != "$ref"})
    return merged


def _apply_defaults(schema: Mapping[str, Any], value: object, root: Mapping[str, Any]) -> None:
    """Fill in every missing property that has a ``default``, recursively, in place."""
    schema = _resolve(schema, root)
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _apply_defaults(sub, value[key], root)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _apply_defaults(schema["items"], item, root)


# --------------------------------------------------------------------------- messages

_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    dict: "object",
    list: "array",
    type(None): "null",
}


def _short(value: object, limit: int = 40) -> str:
    """A value as it would read in the file, never a whole document."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        text = value if len(value) <= limit else value[: limit - 3] + "..."
        return f"'{text}'" if text.isprintable() else repr(text)
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: object) -> str:
    for t, name in _TYPE_NAMES.items():
        if type(value) is t:
            return name
    return type(value).__name__  # a YAML date, for instance


def _found(value: object) -> str:
    kind = _kind(value)
    if isinstance(value, dict | list):
        return f"found {kind}"
    if value is None:
        return "found null"
    return f"found {kind} {_short(value)}"


def _or(words: Iterable[str]) -> str:
    items = list(words)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _messages(error: Any, root: Mapping[str, Any]) -> list[tuple[JsonPath, JsonPath, str]]:
    """(path shown, path whose line is shown, message) for one jsonschema error.

    An unknown key is reported at the object that holds it, with the line of the key.
    """
    path = _norm(error.absolute_path)
    kind = error.validator
    expected = error.validator_value
    value = error.instance
    schema = _resolve(error.schema, root) if isinstance(error.schema, Mapping) else {}

    if kind == "additionalProperties" and isinstance(value, dict):
        allowed = sorted(schema.get("properties", {}))
        out: list[tuple[JsonPath, JsonPath, str]] = []
        for key in value:
            if str(key) in allowed:
                continue
            message = f"'{key}' is not allowed"
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean '{close[0]}'?)"
            elif allowed:
                message += f" (allowed: {', '.join(allowed)})"
            out.append((path, (*path, str(key)), message))
        return out
    if kind == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        message = f"expected {_or(types)}, {_found(value)}"
        if "string" in types and isinstance(value, bool | int | float):
            message += " (put the value in quotes to make it a string)"
        return [(path, path, message)]
    if kind == "enum":
        choices = ", ".join(map(_short, expected))
        return [(path, path, f"expected one of {choices}; found {_short(value)}")]
    if kind == "const":
        return [(path, path, f"expected {_short(expected)}, found {_short(value)}")]
    if kind == "required":
        missing = [k for k in expected if isinstance(value, dict) and k not in value]
        return [(path, path, f"missing required key '{k}'") for k in missing]
    if kind == "minimum":
        return [(path, path, f"expected at least {expected}, found {_short(value)}")]
    if kind == "maximum":
        return [(path, path, f"expected at most {expected}, found {_short(value)}")]
    if kind == "exclusiveMinimum":
        return [(path, path, f"expected more than {expected}, found {_short(value)}")]
    if kind == "exclusiveMaximum":
        return [(path, path, f"expected less than {expected}, found {_short(value)}")]
    if kind == "minLength":
        least = _plural(expected, "character")
        return [(path, path, f"expected at least {least}, found {_short(value)}")]
    if kind == "maxLength":
        found = f"{_short(value)} ({_plural(len(value), 'character')})"
        return [(path, path, f"expected at most {_plural(expected, 'character')}, found {found}")]
    if kind == "pattern":
        hint = schema.get("patternErrorMessage") or f"expected text matching {expected}"
        return [(path, path, f"{hint}, found {_short(value)}")]
    if kind == "minItems":
        return [(path, path, f"expected at least {_plural(expected, 'item')}, found {len(value)}")]
    if kind == "maxItems":
        return [(path, path, f"expected at most {_plural(expected, 'item')}, found {len(value)}")]
    message = str(error.message)
    return [(path, path, message if len(message) <= 200 else message[:197] + "...")]


def _schema_issues(
    parsed: _Parsed, doc: object, schema: Mapping[str, Any], blame: Mapping[str, Path]
) -> list[ConfigIssue]:
    """Every schema error in ``doc`` as issues sorted by line.

    ``blame`` maps top-level keys that did not come from the file (overrides) to the
    ``file`` their issues are reported against.
    """
    # Imported here: jsonschema costs ~0.1 s of start-up, and commands that only read
    # rule sets and profiles (fiona anonymize) never validate a config.
    from jsonschema import Draft202012Validator

    issues: list[ConfigIssue] = []
    for error in Draft202012Validator(schema).iter_errors(doc):
        for path, where, message in _messages(error, schema):
            top = where[0] if where else None
            if isinstance(top, str) and top in blame:
                issues.append(ConfigIssue(blame[top], None, format_path(path), message))
            else:
                issues.append(
                    ConfigIssue(parsed.file, parsed.line_of(where), format_path(path), message)
                )
    issues.sort(key=_issue_order)
    return issues


def _issue_order(issue: ConfigIssue) -> tuple[int, int, str, str]:
    return (
        0 if issue.file != COMMAND_LINE else 1,
        issue.line if issue.line is not None else 0,
        issue.path,
        issue.message,
    )


# --------------------------------------------------------------------------- site


def _site_issues(
    path: Path | None, overrides: Mapping[str, object] | None
) -> tuple[SiteConfig | None, list[ConfigIssue]]:
    schema = _load_schema("site")
    if path is None:
        parsed = _Parsed(COMMAND_LINE, {}, {}, [])
    else:
        parsed = _parse(path)
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
            ConfigIssue(parsed.file, None, "(root)", f"expected object, {_found(parsed.data)}")
        )
        return None, issues

    doc = dict(from_file)
    blame: dict[str, Path] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        doc[key] = str(value) if isinstance(value, Path) else value
        blame[key] = COMMAND_LINE
    schema_issues = _schema_issues(parsed, doc, schema, blame)
    issues = sorted(issues + schema_issues, key=_issue_order)
    if schema_issues:
        return None, issues

    _apply_defaults(schema, doc, schema)
    base = path.parent if path is not None else None

    def file_path(key: str, value: str) -> Path:
        p = Path(value).expanduser()
        in_file = key in from_file and key not in blame
        return base / p if base is not None and in_file and not p.is_absolute() else p

    tls_doc = doc["tls"]
    tls_in_file = from_file.get("tls", {}) if "tls" not in blame else {}

    def tls_path(key: str) -> Path | None:
        value = tls_doc[key]
        if value is None:
            return None
        p = Path(value).expanduser()
        return base / p if base is not None and key in tls_in_file and not p.is_absolute() else p

    index_url = doc["index_url"]
    prefix = "sqlite:///"
    if index_url.startswith(prefix) and "index_url" not in blame:
        index_url = prefix + str(file_path("index_url", index_url[len(prefix) :]))

    site = SiteConfig(
        source=path,
        ae_title=doc["ae_title"],
        port=int(doc["port"]),
        bind_address=doc["bind_address"],
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
        retention=RetentionPolicy(
            interval=float(doc["retention"]["interval_seconds"]),
            min_free_percent=float(doc["retention"]["min_free_percent"]),
        ),
        status_http=StatusHttp(
            port=int(doc["status_http"]["port"]), bind=str(doc["status_http"]["bind"])
        ),
    )
    issues += sorted(_check_tls(site.tls, parsed), key=_issue_order)
    return (None if issues else site), issues


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


def _check_tls(tls: TlsConfig, parsed: _Parsed) -> list[ConfigIssue]:
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
    schema = _load_schema("project")
    parsed = _parse(path)
    if parsed.data is None and parsed.issues:
        return None, parsed.issues, None
    data = {} if parsed.data is None else parsed.data
    issues = list(parsed.issues)
    if not isinstance(data, dict):
        issues.append(ConfigIssue(path, None, "(root)", f"expected object, {_found(data)}"))
        return None, issues, None
    doc = copy.deepcopy(data)
    issues = sorted(issues + _schema_issues(parsed, doc, schema, {}), key=_issue_order)
    if issues:
        return None, issues, None
    _apply_defaults(schema, doc, schema)
    project = ProjectConfig(
        name=doc["name"],
        source=path,
        description=doc["description"],
        enabled=bool(doc["enabled"]),
        raw=doc,
    )
    issues = sorted(_project_semantic_issues(project, parsed), key=_issue_order)
    if issues:
        return None, issues, None
    return project, [], parsed.line_of(("name",))


def _project_semantic_issues(project: ProjectConfig, parsed: _Parsed) -> list[ConfigIssue]:
    """Checks of the sections other layers own: routing rules, the pipeline's steps and the
    destinations."""
    # Imported here: those layers build on this module, not the other way round.
    from engine.pipeline.validate import check_pipeline
    from engine.route.config import check_routing
    from engine.transfer.config import check_destinations

    pipeline = project.raw.get("pipeline", [])
    return (
        check_routing(project, parsed.lines)
        + check_pipeline(
            pipeline if isinstance(pipeline, list) else [],
            project.source,
            ("pipeline",),
            parsed.line_of,
        )
        + check_destinations(project, parsed.line_of)
    )


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
