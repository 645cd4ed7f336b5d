"""Read YAML as a node tree so that every value keeps the line it came from.

PyYAML's ``safe_load`` throws line numbers away; config errors must name them. ``compose`` keeps
them, and this module turns the nodes into plain values one key at a time, collecting problems
instead of stopping at the first.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
# ${NAME} takes an environment variable; $${ stands for a literal ${.
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_UNCLOSED_REF = re.compile(r"(?<!\$)\$\{(?![A-Za-z_][A-Za-z0-9_]*\})")
_SHOWN_VALUE_CHARS = 60


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, with where it is."""

    path: str  # dotted YAML path, e.g. "tasks[1].id"
    line: int  # 1-based; 0 when the whole file is meant
    column: int  # 1-based; 0 when unknown
    message: str

    def render(self, filename: str) -> str:
        """Format as ``file:line:col: path: message``, the shape compilers and editors understand."""
        where = filename if self.line == 0 else f"{filename}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class Problems:
    """Collects problems while a document is read."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, path: str, node: Node | None, message: str) -> None:
        """Record a problem at a node (or the whole file when there is none)."""
        line = node.start_mark.line + 1 if node is not None else 0
        column = node.start_mark.column + 1 if node is not None else 0
        self.items.append(Problem(path, line, column, message))


def compose(text: str) -> tuple[Node | None, Problem | None]:
    """Parse YAML text into a node tree, or return the syntax problem with its line and column."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader), None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        column = mark.column + 1 if mark else 0
        message = f"{exc.context + ': ' if exc.context else ''}{exc.problem or 'invalid YAML'}"
        if "\t" in message or "'\\t'" in message:
            message = "tab character; YAML allows only spaces for indentation and before comments"
        return None, Problem("", line, column, f"invalid YAML: {message}")
    except yaml.YAMLError as exc:
        return None, Problem("", 0, 0, f"invalid YAML: {exc}")


def is_null(node: Node | None) -> bool:
    """True for a missing value or an explicit YAML null."""
    return node is None or (isinstance(node, ScalarNode) and node.tag == _NULL_TAG)


def describe(node: Node, *, secret: bool = False) -> str:
    """Name a node's YAML type for error messages; a ``secret`` value is not repeated."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL_TAG:
        return "null"
    kind = node.tag.rsplit(":", 1)[-1]
    if secret:
        return f"a value of type {kind}"
    return f"{kind} {shorten(str(node.value))!r}"


def shorten(text: str) -> str:
    """Cut a value from the file to a readable length before it goes into a message."""
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[: _SHOWN_VALUE_CHARS - 3] + "..."


def mapping_items(
    node: Node,
    path: str,
    allowed: frozenset[str],
    problems: Problems,
    *,
    elsewhere: Mapping[str, str] | None = None,
    secret: bool = False,
) -> dict[str, Node] | None:
    """Return a mapping's values by key, reporting unknown and repeated keys.

    ``elsewhere`` maps the keys of other sections to their section (``"timeout": "polling"``), so
    that a key written in the wrong place, or a typo of one, is answered with where it belongs.
    A ``secret`` section (auth) never has its value repeated in a problem.
    """
    if not isinstance(node, MappingNode):
        problems.add(path, node, f"must be a mapping, not {describe(node, secret=secret)}")
        return None
    items: dict[str, Node] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        where = f"{path}.{shorten(key)}" if path else shorten(key)
        if key in items:
            problems.add(where, key_node, "key appears twice")
        elif key not in allowed:
            problems.add(
                where, key_node, f"unknown key ({_unknown_key_hint(key, allowed, elsewhere)})"
            )
        items[key] = value_node
    return items


def _unknown_key_hint(
    key: str, allowed: frozenset[str], elsewhere: Mapping[str, str] | None
) -> str:
    """Suggest the key that was probably meant: a close one here, else one in another section."""
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    others = dict(elsewhere or {})
    if key in others:
        return f"it belongs under {others[key]}"
    close = difflib.get_close_matches(key, sorted(others), n=1)
    if close:
        return f"did you mean {close[0]!r} under {others[close[0]]}?"
    return f"allowed: {', '.join(sorted(allowed))}"


def sequence_items(node: Node, path: str, problems: Problems) -> Iterator[tuple[str, Node]]:
    """Yield each list element with its path."""
    if not isinstance(node, SequenceNode):
        problems.add(path, node, f"must be a list, not {describe(node)}")
        return
    for index, item in enumerate(node.value):
        yield f"{path}[{index}]", item


def scalar(node: Node, path: str, problems: Problems) -> Any:
    """Construct a scalar's Python value, or report that the node is not a scalar."""
    if not isinstance(node, ScalarNode):
        problems.add(path, node, f"must be a single value, not {describe(node)}")
        return None
    try:
        return SafeConstructor().construct_object(node, deep=True)
    except ConstructorError as exc:
        problems.add(path, node, f"unreadable value: {exc.problem}")
        return None


def string(
    node: Node, path: str, problems: Problems, *, expand_env: bool = True, secret: bool = False
) -> str | None:
    """Read a value that must be written as a string; ``${VAR}`` takes an environment variable.

    Unquoted numbers are refused rather than converted: YAML reads ``0123`` as an octal int, so a
    silent ``str()`` would turn a task ID into ``83``. The value of a ``secret`` never appears in
    a problem, since problems are printed and logged.
    """
    if not isinstance(node, ScalarNode):
        problems.add(path, node, f"must be a string, not {describe(node, secret=secret)}")
        return None
    if node.tag != _STR_TAG:
        problems.add(
            path,
            node,
            f"must be a string, not {describe(node, secret=secret)}; put it in quotes",
        )
        return None
    text = str(node.value)
    if not expand_env:
        return text
    if _UNCLOSED_REF.search(text):
        problems.add(
            path, node, "has a ${ that is not a ${NAME} reference; write $${ for a literal ${"
        )
        return None
    missing = [name for name in _ENV_REF.findall(text) if name and name not in os.environ]
    if missing:
        problems.add(path, node, f"environment variable {', '.join(missing)} is not set")
        return None
    return _ENV_REF.sub(lambda match: os.environ[match.group(1)] if match.group(1) else "${", text)
