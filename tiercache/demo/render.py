"""Renderer for MailChimp merge tags such as ``*|FNAME|*`` and ``*|IF:X|*`` blocks.

Supported syntax, as in MailChimp's merge tag language:

* ``*|NAME|*`` inserts the merge field ``NAME``, HTML-escaped.
* ``*|HTML:NAME|*`` inserts the merge field ``NAME`` as raw HTML.
* ``*|IF:NAME|*``, ``*|IFNOT:NAME|*``, ``*|ELSEIF:NAME|*``, ``*|ELSE:|*`` and
  ``*|END:IF|*`` select a branch. Blocks nest to any depth.
* A condition may compare: ``*|IF:POINTS>=1000|*``, ``*|IF:LOCALE=de_DE|*``,
  with ``=``, ``!=``, ``>``, ``<``, ``>=`` and ``<=``. The comparison is
  numeric when both sides parse as numbers, otherwise it compares strings.

A field is true when it is present and not ``None``, ``False`` or the empty
string, so a numeric 0 is true. A tag that names no known field is left in
the output unchanged, and a condition on an unknown field is false.
"""

from __future__ import annotations

import functools
import html
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

TAG_PATTERN = re.compile(r"\*\|([^|]{1,200}?)\|\*")
_CONDITION_PATTERN = re.compile(
    r"^(?P<field>[^=!<>]+?)\s*(?P<op>!=|>=|<=|=|>|<)\s*(?P<operand>.*)$"
)
_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
}


class TemplateSyntaxError(ValueError):
    """A template with unbalanced or misplaced ``IF``/``ELSE``/``END:IF`` tags."""


@dataclass(frozen=True, slots=True)
class _Text:
    text: str


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    is_raw_html: bool
    source: str


@dataclass(frozen=True, slots=True)
class _Condition:
    field: str
    operator: str | None
    operand: str
    is_negated: bool

    def evaluate(self, fields: Mapping[str, object]) -> bool:
        value = _lookup(fields, self.field)
        if self.operator is None:
            result = _is_true(value)
        else:
            result = _compare(value, self.operator, self.operand)
        return result != self.is_negated


@dataclass(slots=True)
class _Block:
    """An IF block: (condition, body) branches, ``None`` condition for ELSE."""

    branches: list[tuple[_Condition | None, list[_Node]]]
    offset: int


_Node = _Text | _Field | _Block


class Template:
    """A parsed template that renders many times without parsing again."""

    def __init__(self, source: str) -> None:
        """Parse ``source``.

        :raises TemplateSyntaxError: if IF blocks are unbalanced or an ELSE
            or ELSEIF is misplaced.
        """
        self.source = source
        self._nodes = _parse(source)

    def render(self, fields: Mapping[str, object], *, escape: bool = True) -> str:
        """Return the template with merge tags filled from ``fields``.

        :param fields: merge field values keyed by tag name, e.g. ``"FNAME"``
            or ``"MC:SUBJECT"``.
        :param escape: HTML-escape the values of plain ``*|NAME|*`` tags; pass
            ``False`` for plain text such as a subject line.
        """
        parts: list[str] = []
        _render_nodes(self._nodes, fields, parts, escape)
        return "".join(parts)


@functools.lru_cache(maxsize=128)
def compile_template(source: str) -> Template:
    """Return the parsed template for ``source``, reusing earlier parses."""
    return Template(source)


def render(source: str, fields: Mapping[str, object], *, escape: bool = True) -> str:
    """Render the template ``source`` with ``fields``.

    :param escape: see :meth:`Template.render`.
    :raises TemplateSyntaxError: if the template's IF blocks are malformed.
    """
    return compile_template(source).render(fields, escape=escape)


def _parse(source: str) -> list[_Node]:
    root: list[_Node] = []
    # Each open block is kept with the body of its current branch. New nodes
    # go to the innermost body, or to the root while no block is open.
    open_blocks: list[tuple[_Block, list[_Node]]] = []
    target = root
    position = 0

    for match in TAG_PATTERN.finditer(source):
        if match.start() > position:
            target.append(_Text(source[position : match.start()]))
        position = match.end()
        tag = match.group(1).strip()
        keyword, _, argument = tag.partition(":")
        keyword = keyword.upper()

        if keyword in ("IF", "IFNOT") and argument:
            block = _Block([], match.start())
            body: list[_Node] = []
            block.branches.append((_parse_condition(argument, keyword), body))
            target.append(block)
            open_blocks.append((block, body))
            target = body
        elif keyword in ("ELSEIF", "ELSE"):
            block = _require_open_block(open_blocks, tag, match.start())
            if block.branches[-1][0] is None:
                raise TemplateSyntaxError(
                    f"*|{tag}|* at offset {match.start()} follows *|ELSE:|* in the "
                    f"block opened at offset {block.offset}; move it before the ELSE"
                )
            if keyword == "ELSEIF" and not argument:
                raise TemplateSyntaxError(
                    f"*|{tag}|* at offset {match.start()} has no condition; "
                    "write *|ELSEIF:FIELD|* or *|ELSE:|*"
                )
            condition = (
                _parse_condition(argument, "IF") if keyword == "ELSEIF" else None
            )
            body = []
            block.branches.append((condition, body))
            open_blocks[-1] = (block, body)
            target = body
        elif tag.upper() == "END:IF":
            _require_open_block(open_blocks, tag, match.start())
            open_blocks.pop()
            target = open_blocks[-1][1] if open_blocks else root
        else:
            target.append(_parse_field(tag, match.group(0)))

    if open_blocks:
        block = open_blocks[-1][0]
        raise TemplateSyntaxError(
            f"the IF block opened at offset {block.offset} is never closed; "
            "add *|END:IF|*"
        )
    if position < len(source):
        root.append(_Text(source[position:]))
    return root


def _require_open_block(
    open_blocks: list[tuple[_Block, list[_Node]]], tag: str, offset: int
) -> _Block:
    if not open_blocks:
        raise TemplateSyntaxError(
            f"*|{tag}|* at offset {offset} has no open *|IF:...|* block; "
            "add the IF or remove this tag"
        )
    return open_blocks[-1][0]


def _parse_condition(argument: str, keyword: str) -> _Condition:
    match = _CONDITION_PATTERN.match(argument)
    if match is None:
        return _Condition(argument.strip(), None, "", keyword == "IFNOT")
    return _Condition(
        match.group("field").strip(),
        match.group("op"),
        match.group("operand").strip(),
        keyword == "IFNOT",
    )


def _parse_field(tag: str, source: str) -> _Field:
    prefix, _, name = tag.partition(":")
    if prefix.upper() == "HTML" and name:
        return _Field(name, True, source)
    return _Field(tag, False, source)


def _render_nodes(
    nodes: list[_Node], fields: Mapping[str, object], parts: list[str], escape: bool
) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            parts.append(node.text)
        elif isinstance(node, _Field):
            parts.append(_render_field(node, fields, escape))
        else:
            for condition, body in node.branches:
                if condition is None or condition.evaluate(fields):
                    _render_nodes(body, fields, parts, escape)
                    break


def _render_field(node: _Field, fields: Mapping[str, object], escape: bool) -> str:
    value = _lookup(fields, node.name, default=_UNKNOWN)
    if value is _UNKNOWN:
        return node.source
    text = _format(value)
    if node.is_raw_html or not escape:
        return text
    return html.escape(text, quote=True)


_UNKNOWN = object()


def _lookup(fields: Mapping[str, object], name: str, default: object = None) -> object:
    if name in fields:
        return fields[name]
    return fields.get(name.upper(), default)


def _is_true(value: object) -> bool:
    return value is not None and value is not False and value != ""


def _format(value: object) -> str:
    if value is None or value is False:
        return ""
    return str(value)


def _compare(value: object, op: str, operand: str) -> bool:
    text = _format(value)
    left = _as_number(text)
    right = _as_number(operand)
    if left is not None and right is not None:
        return _COMPARISONS[op](left, right)
    return _COMPARISONS[op](text, operand)


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
