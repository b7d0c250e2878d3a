"""Reading a config file: YAML (or JSON) with the line of every key, within bounds.

:func:`parse_file` never raises for a bad file: syntax errors, duplicate keys and files past
the bounds below become issues (:class:`~engine.config.issues.ConfigIssue`) of the
:class:`ParsedFile` it returns, which also knows the line of every JSON path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.config.issues import ConfigIssue, JsonPath, format_path, norm_path

__all__ = [
    "MAX_CONFIG_ALIASES",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_NODES",
    "ConfigTooBig",
    "LineLoader",
    "ParsedFile",
    "key_line",
    "parse_file",
]


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
class ParsedFile:
    """A config file as read: its data (None when it could not be read or is empty), the
    line of every JSON path in it, and the problems found while reading it."""

    file: Path
    data: object
    lines: dict[JsonPath, int]
    issues: list[ConfigIssue]

    def line_of(self, path: Iterable[object]) -> int | None:
        """Line of ``path``'s key, else of its nearest parent with one (None for the root)."""
        return nearest_line(self.lines, path)


def nearest_line(lines: Mapping[JsonPath, int], path: Iterable[object]) -> int | None:
    """The line in ``lines`` of ``path``'s key, else of its nearest parent with one (None when
    none has, the root included)."""
    parts = norm_path(path)
    while parts:
        if parts in lines:
            return lines[parts]
        parts = parts[:-1]
    return None


_YAML_HINTS = {
    "mapping values are not allowed here": "check the indentation, and quote values holding ': '",
    "found character '\\t'": "indent with spaces, not tabs",
    "end of stream": "a quote or bracket is not closed",
    "<stream end>": "a quote or bracket is not closed",
}


def _failed(file: Path, line: int | None, message: str) -> ParsedFile:
    return ParsedFile(file, None, {}, [ConfigIssue(file, line, "(root)", message)])


def parse_file(file: Path) -> ParsedFile:
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
    return ParsedFile(file, data, loader.lines, issues)


def key_line(file: Path, keys: Iterable[str]) -> int | None:
    """The line of the mapping key at ``keys`` in a YAML file that already loaded (or of its
    nearest parent key); None when it cannot be found (JSON on one line, say)."""
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
