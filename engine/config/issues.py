"""Config problems and how they read: ``file:line path: message``.

Every config check of every layer reports a :class:`ConfigIssue`, built with the wording
helpers here, so that all of ``fiona validate``'s messages read alike: where (file, line, JSON
path), what was expected and what was found, and a "did you mean" for a near miss.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "COMMAND_LINE",
    "ConfigError",
    "ConfigIssue",
    "JsonPath",
    "LineOf",
    "close_match",
    "describe",
    "did_you_mean",
    "format_path",
    "found_value",
    "issue_order",
    "kind_of",
    "norm_path",
]

#: A JSON path in a config document: ``("destinations", "pacs", "port")``, ``("pipeline", 0)``.
JsonPath = tuple[str | int, ...]
#: The line of a JSON path in its file (None: unknown).
LineOf = Callable[[JsonPath], int | None]

#: ``ConfigIssue.file`` of a problem in a command-line override (``--port 0``).
COMMAND_LINE = Path("(command line)")


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


def norm_path(path: Iterable[object]) -> JsonPath:
    """``path`` with every part an int (a list index) or a str (a key)."""
    return tuple(p if isinstance(p, int) and not isinstance(p, bool) else str(p) for p in path)


def issue_order(issue: ConfigIssue) -> tuple[int, int, str, str]:
    """Sort key of issues: file problems by line, then command-line ones."""
    return (
        0 if issue.file != COMMAND_LINE else 1,
        issue.line if issue.line is not None else 0,
        issue.path,
        issue.message,
    )


def close_match(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice ``word`` most likely misspells (None: none is within ``cutoff``)."""
    found_ = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return found_[0] if found_ else None


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for a near miss among ``choices``, else ''."""
    close = close_match(word, choices, cutoff)
    return f" (did you mean '{close}'?)" if close else ""


_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    dict: "object",
    list: "array",
    type(None): "null",
}


def describe(value: object, limit: int = 40) -> str:
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


def kind_of(value: object) -> str:
    """The JSON type name of ``value`` (``string``, ``object``, ...)."""
    for t, name in _TYPE_NAMES.items():
        if type(value) is t:
            return name
    return type(value).__name__  # a YAML date, for instance


def found_value(value: object) -> str:
    """``found string 'x'``, ``found object``: the second half of an "expected ..." message."""
    kind = kind_of(value)
    if isinstance(value, dict | list):
        return f"found {kind}"
    if value is None:
        return "found null"
    return f"found {kind} {describe(value)}"
