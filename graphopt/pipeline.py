"""Textual pass pipelines (MLIR style) and named presets.

Grammar::

    pipeline := item ("," item)*
    item     := NAME [ "{" option ("," option)* "}" ]
    option   := KEY "=" VALUE
    VALUE    := bare text without , { } [ ] " or space | "[" VALUE ("," VALUE)* "]" | '"' text '"'

``str(parse_pipeline(s))`` gives a canonical string that parses back to an equal pipeline.
A preset name may stand for its whole pipeline. Errors carry the 1-based column and, for a
misspelt pass or option, the nearest valid name.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from graphopt.errors import PipelineError
from graphopt.passbase import Pass, format_value, registry

_PRESETS: dict[str, tuple[str, str]] = {}
_VALUE_STOP = set(',{}[]" ')  # where a bare value ends ('=' may appear inside one)


def register_preset(name: str, pipeline: str, doc: str) -> None:
    """Store a named pipeline string (presets are just strings)."""
    _PRESETS[name] = (pipeline, doc)


def presets() -> dict[str, tuple[str, str]]:
    registry()  # the pass library registers its presets on import
    return dict(_PRESETS)


@dataclass
class Pipeline:
    passes: list[Pass] = field(default_factory=list)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)


def _nearest(word: str, choices) -> str:
    m = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{m[0]}'?" if m else ""


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.depth = 0  # list nesting at pos

    def error(self, msg: str, pos: int | None = None) -> PipelineError:
        p = self.pos if pos is None else pos
        return PipelineError(msg, self.text, p + 1)

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def ident(self, what: str) -> tuple[str, int]:
        self.ws()
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] in "-_."):
            self.pos += 1
        if self.pos == start:
            got = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {what}, got {got}")
        return self.text[start:self.pos], start

    def expect(self, ch: str) -> None:
        self.ws()
        if self.peek() != ch:
            got = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected '{ch}', got {got}")
        self.pos += 1

    def value(self) -> tuple[Any, int]:
        """Returns a str (bare or quoted) or a list of values."""
        self.ws()
        start = self.pos
        c = self.peek()
        if c == "[":
            self.depth += 1
            if self.depth > _MAX_NESTING:
                raise self.error(f"lists nest deeper than {_MAX_NESTING} levels", start)
            self.pos += 1
            items = []
            self.ws()
            if self.peek() == "]":
                self.pos += 1
                self.depth -= 1
                return [], start
            while True:
                v, _ = self.value()
                items.append(v)
                self.ws()
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                self.depth -= 1
                return items, start
        if c == '"':
            self.pos += 1
            out = []
            while True:
                if self.pos >= len(self.text):
                    raise self.error("unterminated quoted value", start)
                ch = self.text[self.pos]
                if ch == "\\" and self.pos + 1 < len(self.text):
                    out.append(self.text[self.pos + 1])
                    self.pos += 2
                    continue
                if ch == '"':
                    self.pos += 1
                    return _Quoted("".join(out)), start
                out.append(ch)
                self.pos += 1
        while self.pos < len(self.text) and self.text[self.pos] not in _VALUE_STOP:
            self.pos += 1
        if self.pos == start:
            got = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected a value, got {got}")
        return self.text[start:self.pos], start


_MAX_NESTING = 8


class _Quoted(str):
    """A value that was written in quotes (so 'none' stays the string 'none')."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true|false", int: "an integer", float: "a finite number", str: "a string", type(None): "none"}.get(tp, str(tp))


def convert_value(raw: Any, tp: Any) -> Any:
    """Convert parsed text to the option's annotated type; ValueError on mismatch."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and isinstance(raw, str) and not isinstance(raw, _Quoted) and raw.lower() == "none":
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return convert_value(raw, a)
            except ValueError:
                pass
        raise ValueError
    if origin is list:
        (elem,) = typing.get_args(tp)
        items = raw if isinstance(raw, list) else [raw]
        return [convert_value(x, elem) for x in items]
    if isinstance(raw, list):
        raise ValueError
    if origin is Literal:
        for a in typing.get_args(tp):
            if str(a) == raw:
                return a
        raise ValueError
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError
    if tp is int:
        return int(raw)
    if tp is float:
        v = float(raw)
        if not math.isfinite(v):
            raise ValueError  # nan / inf are never a meaningful option value
        return v
    if tp is str:
        return str(raw)
    if tp is Any:
        return str(raw)
    raise ValueError


def _check_bounds(cls: type[Pass], name: str, value: Any) -> str | None:
    f = next(f for f in cls.options() if f.name == name)
    meta = f.metadata
    vals = value if isinstance(value, list) else [value]
    for v in vals:
        if meta.get("choices") and v not in meta["choices"]:
            return f"must be one of {', '.join(map(str, meta['choices']))}"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if meta.get("min") is not None and v < meta["min"]:
                return f"must be >= {meta['min']}"
            if meta.get("max") is not None and v > meta["max"]:
                return f"must be <= {meta['max']}"
    return None



def parse_pipeline(text: str, _depth: int = 0) -> Pipeline:
    """Parse a pipeline string into pass instances (see module doc for the grammar)."""
    reg = registry()
    pre = presets()
    ps = _Parser(text)
    ps.ws()
    if ps.pos >= len(text):
        raise PipelineError("the pipeline is empty", text, 1)
    out: list[Pass] = []
    where: list[int] = []  # column of each pass (a preset's passes share the preset's column)
    while True:
        name, npos = ps.ident("a pass name")
        ps.ws()
        if name not in reg:
            if name in pre and ps.peek() != "{" and _depth < 4:
                expanded = parse_pipeline(pre[name][0], _depth + 1).passes
                out.extend(expanded)
                where.extend([npos] * len(expanded))
            else:
                raise ps.error(f"unknown pass '{name}'{_nearest(name, list(reg) + list(pre))}", npos)
        else:
            cls = reg[name]
            hints = cls.option_types()
            fields = {f.name for f in cls.options()}
            kwargs: dict[str, Any] = {}
            if ps.peek() == "{":
                ps.pos += 1
                ps.ws()
                if ps.peek() == "}":
                    ps.pos += 1
                else:
                    while True:
                        key, kpos = ps.ident("an option name")
                        if key not in fields:
                            hint = _nearest(key, fields) if fields else f"; pass '{name}' takes no options"
                            raise ps.error(f"pass '{name}' has no option '{key}'{hint}", kpos)
                        if key in kwargs:
                            raise ps.error(f"option '{key}' of pass '{name}' is given twice", kpos)
                        ps.expect("=")
                        raw, vpos = ps.value()
                        try:
                            val = convert_value(raw, hints[key])
                        except ValueError:
                            shown = format_value(raw) if isinstance(raw, list) else raw
                            raise ps.error(f"option '{key}' of pass '{name}' expects {_type_name(hints[key])}, "
                                           f"got '{shown}'", vpos) from None
                        bad = _check_bounds(cls, key, val)
                        if bad:
                            raise ps.error(f"option '{key}' of pass '{name}' {bad}, got '{format_value(val)}'", vpos)
                        kwargs[key] = val
                        ps.ws()
                        if ps.peek() == ",":
                            ps.pos += 1
                            continue
                        ps.expect("}")
                        break
            try:
                out.append(cls(**kwargs))
                where.append(npos)
            except (TypeError, ValueError) as e:
                raise ps.error(f"pass '{name}': {e}", npos) from None
        ps.ws()
        if ps.pos >= len(text):
            break
        ps.expect(",")
    if _depth == 0:
        check_order(out, where, text)
    return Pipeline(out)


def check_order(passes: list[Pass], where: list[int] | None = None, text: str = "") -> None:
    """Enforce the passes' declared ordering (``Pass.after`` / ``Pass.before``). The error names
    both passes and, for a parsed pipeline, the column of the misplaced one."""
    names = [p.name for p in passes]
    for i, p in enumerate(passes):
        wrong = [(other, "after", k) for other in p.after for k in range(i + 1, len(names)) if names[k] == other]
        wrong += [(other, "before", k) for other in p.before for k in range(i) if names[k] == other]
        if not wrong:
            continue
        other, rel, j = wrong[0]
        msg = f"'{p.name}' must come {rel} '{other}'"
        if where is None:
            raise PipelineError(f"{msg} (pass {i + 1} of the list; '{other}' is pass {j + 1})")
        raise PipelineError(f"{msg} ('{other}' is at column {where[j] + 1})", text, where[i] + 1)
