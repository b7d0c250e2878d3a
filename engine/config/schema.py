"""Config schemas: finding them, their defaults, and their errors as messages people can act on.

The one place that turns a jsonschema error into ``file:line path: expected ..., found ...``
(with a "did you mean" for a misspelt key): the project and site loaders, the pipeline steps'
and destinations' option fragments, rule sets and pixel rules all check through
:func:`schema_issues`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from engine.config.issues import (
    ConfigIssue,
    JsonPath,
    LineOf,
    close_match,
    describe,
    format_path,
    found_value,
    norm_path,
)

__all__ = [
    "apply_defaults",
    "load_schema",
    "locate_issues",
    "resolve_ref",
    "schema_dir",
    "schema_issues",
    "schema_messages",
    "subpaths",
]


def schema_dir() -> Path:
    """Folder holding ``site.schema.json`` and ``project.schema.json``.

    ``$FIONA_SCHEMAS`` if set (for installed wheels), else ``<repo>/schemas``.
    """
    env = os.environ.get("FIONA_SCHEMAS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "schemas"


@functools.cache
def _cached_schema(name: str, folder: Path) -> dict[str, Any]:
    file = folder / f"{name}.schema.json"
    try:
        loaded = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"config schema not found: {file} (set FIONA_SCHEMAS to the schemas/ folder)"
        ) from None
    return cast(dict[str, Any], loaded)


def load_schema(name: str, folder: Path | None = None) -> dict[str, Any]:
    """``<folder>/<name>.schema.json`` (default: :func:`schema_dir`), read once."""
    return _cached_schema(name, schema_dir() if folder is None else folder)


def resolve_ref(schema: Mapping[str, Any], root: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` with a local ``$ref`` (``#/$defs/x``) merged in; its own keys win."""
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return dict(schema)
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part]
    merged = resolve_ref(target, root)
    merged.update({k: v for k, v in schema.items() if k != "$ref"})
    return merged


def apply_defaults(schema: Mapping[str, Any], value: object, root: Mapping[str, Any]) -> None:
    """Fill in every missing property that has a ``default``, recursively, in place."""
    schema = resolve_ref(schema, root)
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key], root)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item, root)


def _or(words: Iterable[str]) -> str:
    items = list(words)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def schema_messages(error: Any, root: Mapping[str, Any]) -> list[tuple[JsonPath, JsonPath, str]]:
    """(path shown, path whose line is shown, message) for one jsonschema error.

    An unknown key is reported at the object that holds it, with the line of the key.
    """
    path = norm_path(error.absolute_path)
    kind = error.validator
    expected = error.validator_value
    value = error.instance
    schema = resolve_ref(error.schema, root) if isinstance(error.schema, Mapping) else {}

    if kind == "additionalProperties" and isinstance(value, dict):
        allowed = sorted(schema.get("properties", {}))
        out: list[tuple[JsonPath, JsonPath, str]] = []
        for key in value:
            if str(key) in allowed:
                continue
            message = f"'{key}' is not allowed"
            close = close_match(str(key), allowed)
            if close:
                message += f" (did you mean '{close}'?)"
            elif allowed:
                message += f" (allowed: {', '.join(allowed)})"
            out.append((path, (*path, str(key)), message))
        return out
    if kind == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        message = f"expected {_or(types)}, {found_value(value)}"
        if "string" in types and isinstance(value, bool | int | float):
            message += " (put the value in quotes to make it a string)"
        return [(path, path, message)]
    if kind == "enum":
        choices = ", ".join(map(describe, expected))
        return [(path, path, f"expected one of {choices}; found {describe(value)}")]
    if kind == "const":
        return [(path, path, f"expected {describe(expected)}, found {describe(value)}")]
    if kind == "required":
        missing = [k for k in expected if isinstance(value, dict) and k not in value]
        return [(path, path, f"missing required key '{k}'") for k in missing]
    if kind == "minimum":
        return [(path, path, f"expected at least {expected}, found {describe(value)}")]
    if kind == "maximum":
        return [(path, path, f"expected at most {expected}, found {describe(value)}")]
    if kind == "exclusiveMinimum":
        return [(path, path, f"expected more than {expected}, found {describe(value)}")]
    if kind == "exclusiveMaximum":
        return [(path, path, f"expected less than {expected}, found {describe(value)}")]
    if kind == "minLength":
        least = _plural(expected, "character")
        return [(path, path, f"expected at least {least}, found {describe(value)}")]
    if kind == "maxLength":
        text = f"{describe(value)} ({_plural(len(value), 'character')})"
        return [(path, path, f"expected at most {_plural(expected, 'character')}, found {text}")]
    if kind == "pattern":
        hint = schema.get("patternErrorMessage") or f"expected text matching {expected}"
        return [(path, path, f"{hint}, found {describe(value)}")]
    if kind == "minItems":
        return [(path, path, f"expected at least {_plural(expected, 'item')}, found {len(value)}")]
    if kind == "maxItems":
        return [(path, path, f"expected at most {_plural(expected, 'item')}, found {len(value)}")]
    message = str(error.message)
    return [(path, path, message if len(message) <= 200 else message[:197] + "...")]


def schema_issues(
    doc: object,
    schema: Mapping[str, Any],
    file: Path,
    line_of: LineOf | None = None,
    base: JsonPath = (),
    *,
    at_key: bool = False,
    blame: Mapping[str, Path] | None = None,
) -> list[ConfigIssue]:
    """Every error of ``doc`` against ``schema`` as an issue of ``file``, in the order found.

    ``doc`` sits at JSON path ``base`` of the file; ``line_of`` gives the line of a path of the
    file (None: no lines). A message repeated at one path is reported once. ``at_key``: an
    invalid property name is reported at the key itself rather than at its object. ``blame``
    maps top-level keys that did not come from the file (command-line overrides) to the
    ``file`` their issues are reported against, without a line.
    """
    # Imported here: jsonschema costs ~0.1 s of start-up, and commands that only read
    # rule sets and profiles (fiona anonymize) never validate a config.
    from jsonschema import Draft202012Validator

    seen: set[tuple[JsonPath, str]] = set()
    issues: list[ConfigIssue] = []
    for error in Draft202012Validator(schema).iter_errors(doc):
        for path, where, message in schema_messages(error, schema):
            if at_key and "propertyNames" in error.relative_schema_path:
                where = (*path, str(error.instance))
                path = where
            key = ((*base, *path), message)
            if key in seen:
                continue
            seen.add(key)
            top = where[0] if where else None
            if blame is not None and isinstance(top, str) and top in blame:
                issues.append(ConfigIssue(blame[top], None, format_path(path), message))
                continue
            line = line_of((*base, *where)) if line_of is not None else None
            issues.append(ConfigIssue(file, line, format_path((*base, *path)), message))
    return issues


def subpaths(value: object, path: JsonPath) -> Iterator[JsonPath]:
    """``path`` and the JSON path of everything below it in ``value``."""
    yield path
    if isinstance(value, Mapping):
        for key, sub in value.items():
            yield from subpaths(sub, (*path, str(key)))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from subpaths(sub, (*path, i))


def locate_issues(
    issues: Iterable[ConfigIssue],
    options: object,
    where: JsonPath,
    file: Path,
    line_of: LineOf | None,
) -> list[ConfigIssue]:
    """A plug-in's own issues (a step's or destination's ``check``, made without lines), those
    of ``file`` given the line of their path among ``options`` (found at ``where``)."""
    paths = {format_path(p): p for p in subpaths(options, where)}
    out = []
    for issue in issues:
        if issue.line is None and issue.file == file and line_of is not None:
            issue = ConfigIssue(
                issue.file, line_of(paths.get(issue.path, where)), issue.path, issue.message
            )
        out.append(issue)
    return out
