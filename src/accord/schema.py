"""The shape of every file accord writes and reads, declared once per format.

Each format declares its schema beside its writer and reader, with the types below:

==============================  ==================================  ==========================
file                            schema                              written by / read by
==============================  ==================================  ==========================
``step-<S>/manifest.json``      ``checkpoint.MANIFEST_SCHEMA``      ``save`` / ``verify``,
                                (and ``RANK_FILE_SCHEMA`` for the   ``read``, ``find``
                                fields of each ``rank<r>.pt``)
``metrics.jsonl``               ``metrics.RECORD_SCHEMAS``          the training loop /
                                (header, step, summary, event,      ``scan_metrics``: resume,
                                lifecycle records)                  bench reuse, report
``--network-profile FILE``      ``network.PROFILE_SCHEMA``          the user / ``accord train``
                                                                    and ``accord report``
``tuning.json``                 ``tuning.SCHEMAS`` (versions 1, 2)  ``accord bench --tune`` /
                                                                    the bench and the report
``bench.jsonl``                 ``bench.OUTCOME_SCHEMA``            ``accord bench`` (a log:
                                                                    accord never reads it)
==============================  ==================================  ==========================

A file that does not match is refused with one :class:`SchemaError` line naming the file,
the field (a path such as ``links[0].ranks`` or ``files["rank0.pt"].bytes``) and what
was expected::

    manifest.json: field 'world_size': expected an integer >= 1, got nothing (missing)

Reading a file goes through :func:`read_json` / :func:`parse_json`, which refuse what
``json.loads`` would turn into a traceback or a surprise: bytes that are not UTF-8 (a
UTF-16 file is named as one), text that is not JSON, integers too long to convert, and
nesting deeper than :data:`MAX_DEPTH` (no accord file is deeper than 6; ``json.loads``
raises ``RecursionError`` near 1000, and code walking a 900-deep value would too).

**Why a small validator written here, not pydantic or msgspec.** Measured on this
machine (Python 3.11, cold imports, noisy): ``import pydantic`` plus one model 240-470 ms,
``import msgspec`` plus one decode 35-105 ms, this module nothing beyond ``json`` (already
imported). ``import accord.checkpoint`` is about 1.7 s (torch), so neither would be
prohibitive, but neither fits better: pydantic's errors are multi-line blocks that would
have to be rewritten into our one line anyway; msgspec's are one line ("Expected `int`,
got `str` - at `$.step`") but it decodes into its own types, has no notion of our
cross-field rules (a manifest's files named after its world size, a tuning point's value
the mean of its runs) or of a "finite number", and adds a compiled dependency to a
library whose only dependencies are torch, numpy, scikit-learn and tqdm. The formats are
five small JSON documents; these ~200 lines say exactly what each field may hold, in the
words the error shows.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

#: the deepest nesting accepted in a file accord reads (its own formats need 6)
MAX_DEPTH = 64

_MISSING = object()


class SchemaError(ValueError):
    """A file that does not have its format's shape, in one line: ``file`` (may be
    empty when the caller names it), ``field`` (empty: the document itself), ``expected``
    and ``got``."""

    def __init__(self, field: str, expected: str, got: str, file: str = "") -> None:
        self.field, self.expected, self.got, self.file = field, expected, got, file
        super().__init__(self._text())

    def _text(self) -> str:
        return f"{_one_line(self.file)}: {self.detail()}" if self.file else self.detail()

    def detail(self) -> str:
        """The message without the file's name."""
        where = f"field '{self.field}': " if self.field else ""
        return _one_line(f"{where}expected {self.expected}, got {self.got}")

    def in_file(self, file: str) -> SchemaError:
        """The same error, naming ``file``."""
        return SchemaError(self.field, self.expected, self.got, file)

    def __reduce__(self):  # picklable across processes, with its fields
        return (SchemaError, (self.field, self.expected, self.got, self.file))


def _one_line(text: str) -> str:
    """``text`` with every line break (of any kind ``str.splitlines`` knows) made a space:
    a name taken from a file or a command line must not break the one line."""
    return " ".join(text.splitlines())


def _name(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else json.dumps(key)


def got(value: Any) -> str:
    """What a value is, short and on one line: ``"abc"``, ``-3``, ``null``, ``[1, 1]``,
    and for a long list or object ``a list of 200``, ``an object with keys a, b, ...``."""
    if value is _MISSING:
        return "nothing (missing)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, str):
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:36] + '..."'
    if isinstance(value, list | dict):  # shown whole when short: [1, 1], {"a": 2}
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = ""
        if text and len(text) <= 40:
            return text
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        keys = ", ".join(_name(str(k)) for k in list(value)[:4]) + \
            (", ..." if len(value) > 4 else "")
        return f"an object with keys {keys}" if value else "an empty object"
    return type(value).__name__


def join(at: str, key: str | int) -> str:
    """The path of ``key`` inside the field at ``at``: ``a.b``, ``a[0]``, ``a["x.pt"]``."""
    if isinstance(key, int):
        return f"{at}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{at}.{key}" if at else key
    return f"{at}[{json.dumps(key)}]"


# -- types --------------------------------------------------------------------------------

class Type:
    """A field's type: :meth:`check` raises :class:`SchemaError` naming the field."""

    expected = "a value"

    def check(self, value: Any, at: str) -> None:
        if not self.accepts(value):
            raise SchemaError(at, self.expected, got(value))

    def accepts(self, value: Any) -> bool:  # pragma: no cover - every type overrides one
        return True


class AnyJSON(Type):
    expected = "any JSON value"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Int(Type):
    def __init__(self, low: int | None = None, high: int | None = None) -> None:
        self.low, self.high = low, high
        if low is not None and high is not None:
            self.expected = f"an integer from {low} to {high}"
        elif low is not None:
            self.expected = f"an integer >= {low}"
        else:
            self.expected = "an integer"

    def accepts(self, value: Any) -> bool:
        return _is_int(value) and (self.low is None or value >= self.low) \
            and (self.high is None or value <= self.high)


class Number(Type):
    """A JSON number (an integer too); ``finite`` refuses NaN and infinities (which
    ``json.loads`` reads from ``NaN`` / ``Infinity``)."""

    def __init__(self, low: float | None = None, *, finite: bool = True) -> None:
        self.low, self.finite = low, finite
        self.expected = ("a finite number" if finite else "a number") + \
            (f" >= {low:g}" if low is not None else "")

    def accepts(self, value: Any) -> bool:
        if not _is_number(value):
            return False
        if self.finite and not math.isfinite(value):
            return False
        return self.low is None or value >= self.low


class Text(Type):
    def __init__(self, *, choices: Iterable[str] | None = None, pattern: str | None = None,
                 nonempty: bool = False, expected: str | None = None) -> None:
        self.choices = tuple(choices) if choices is not None else None
        self.pattern = re.compile(pattern) if pattern is not None else None
        self.nonempty = nonempty
        if expected is not None:
            self.expected = expected
        elif self.choices is not None:
            self.expected = "one of " + ", ".join(json.dumps(c) for c in self.choices)
        else:
            self.expected = "a non-empty string" if nonempty else "a string"

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, str) or (self.nonempty and not value):
            return False
        if self.choices is not None and value not in self.choices:
            return False
        return self.pattern is None or self.pattern.fullmatch(value) is not None


class Boolean(Type):
    expected = "true or false"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


class Const(Type):
    def __init__(self, value: Any) -> None:
        self.value = value
        self.expected = json.dumps(value)

    def accepts(self, value: Any) -> bool:
        return value == self.value and type(value) is type(self.value)


class Nullable(Type):
    def __init__(self, inner: Type) -> None:
        self.inner = inner
        self.expected = f"{inner.expected} or null"

    def check(self, value: Any, at: str) -> None:
        if value is not None:
            try:
                self.inner.check(value, at)
            except SchemaError as e:
                if e.field != at:  # deeper inside: that field's own message
                    raise
                raise SchemaError(at, self.expected, e.got) from None


class Custom(Type):
    """A value a function accepts: ``problem(value)`` returns None, or what was expected
    instead (one line)."""

    def __init__(self, expected: str, problem: Callable[[Any], str | None]) -> None:
        self.expected, self.problem = expected, problem

    def check(self, value: Any, at: str) -> None:
        why = self.problem(value)
        if why is not None:
            raise SchemaError(at, why, got(value))


class ListOf(Type):
    def __init__(self, item: Type, *, min_len: int = 0, max_len: int | None = None,
                 expected: str | None = None) -> None:
        self.item, self.min_len, self.max_len = item, min_len, max_len
        if expected is not None:
            self.expected = expected
        elif max_len is not None and max_len == min_len:
            self.expected = f"a list of {min_len} ({item.expected})"
        else:
            self.expected = ("a non-empty list" if min_len else "a list") + \
                f" of {_plural(item.expected)}"

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, list) or len(value) < self.min_len or \
                (self.max_len is not None and len(value) > self.max_len):
            raise SchemaError(at, self.expected, got(value))
        for i, item in enumerate(value):
            self.item.check(item, join(at, i))


class MapOf(Type):
    """An object with any keys (``key`` checks each), each value a ``value``."""

    def __init__(self, value: Type, *, key: Text | None = None,
                 expected: str | None = None, nonempty: bool = False) -> None:
        self.value, self.key, self.nonempty = value, key, nonempty
        self.expected = expected or ("a non-empty object" if nonempty else "an object")

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, dict) or (self.nonempty and not value):
            raise SchemaError(at, self.expected, got(value))
        for k, v in value.items():
            if self.key is not None and not self.key.accepts(k):
                raise SchemaError(join(at, k), f"a key that is {self.key.expected}",
                                  f"the key {json.dumps(k)}")
            self.value.check(v, join(at, k))


class Record(Type):
    """An object with named fields: ``fields`` maps a name to its type, ``required`` are
    the names that must be there, ``extra`` says whether other names may be (they are
    anything then; ``prefixed`` gives the type of every other field whose name starts
    with a prefix). Fields are checked in declaration order, so the first wrong one is
    named."""

    def __init__(self, fields: Mapping[str, Type], *, required: Iterable[str] = (),
                 extra: bool = False, prefixed: Mapping[str, Type] | None = None,
                 expected: str = "an object") -> None:
        self.fields, self.required = dict(fields), tuple(required)
        self.extra, self.prefixed = extra, dict(prefixed or {})
        self.expected = expected
        unknown = set(self.required) - set(self.fields)
        assert not unknown, f"required fields without a type: {unknown}"

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(at, self.expected, got(value))
        for name, kind in self.fields.items():
            item = value.get(name, _MISSING)
            if item is _MISSING:
                if name in self.required:
                    raise SchemaError(join(at, name), kind.expected, got(_MISSING))
                continue
            kind.check(item, join(at, name))
        for name, item in value.items():
            if name in self.fields:
                continue
            prefix = next((p for p in self.prefixed if name.startswith(p)), None)
            if prefix is not None:
                self.prefixed[prefix].check(item, join(at, name))
            elif not self.extra:
                known = ", ".join(self.fields)
                raise SchemaError(join(at, name), f"no such field (known: {known})",
                                  got(item))


def _plural(expected: str) -> str:
    """'an integer >= 0' -> 'integers >= 0', roughly; good enough for messages."""
    for article in ("an ", "a "):
        if expected.startswith(article):
            head, _, rest = expected[len(article):].partition(" ")
            return f"{head}s" + (f" {rest}" if rest else "")
    return expected


# -- reading ----------------------------------------------------------------------------------

def validate(schema: Type, value: Any, file: str = "") -> Any:
    """``value`` when it has the shape of ``schema``; :class:`SchemaError` naming ``file``
    and the first wrong field otherwise."""
    try:
        schema.check(value, "")
    except SchemaError as e:
        raise e.in_file(file) if file else e from None
    return value


def decode(data: bytes, file: str = "") -> str:
    """UTF-8 text of a file's bytes (a UTF-8 byte order mark is allowed and dropped)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SchemaError("", "UTF-8 text", "UTF-16 text (it starts with a UTF-16 byte "
                          "order mark)", file)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SchemaError("", "UTF-8 text", f"the byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}, which is not UTF-8 (a binary file?)", file) from None


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when lists and objects nest deeper than ``limit`` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def parse_json(text: str | bytes, file: str = "") -> Any:
    """The JSON value of ``text`` (bytes are decoded as UTF-8), or :class:`SchemaError`
    naming ``file``: not UTF-8, not JSON, nested deeper than :data:`MAX_DEPTH`."""
    if isinstance(text, bytes):
        text = decode(text, file)
    try:
        value = json.loads(text)
    except RecursionError:
        raise SchemaError("", f"JSON nested at most {MAX_DEPTH} deep", "deeper nesting",
                          file) from None
    except json.JSONDecodeError as e:
        raise SchemaError("", "JSON", f"{e.msg} at line {e.lineno} column {e.colno}",
                          file) from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise SchemaError("", "JSON", str(e).splitlines()[0], file) from None
    # cheap first: a document with fewer brackets than the limit cannot nest deeper
    if text.count("[") + text.count("{") > MAX_DEPTH and isinstance(value, dict | list) \
            and too_deep(value):
        raise SchemaError("", f"JSON nested at most {MAX_DEPTH} deep", "deeper nesting",
                          file)
    return value


def read_json(path: str | os.PathLike, file: str | None = None,
              schema: Type | None = None) -> Any:
    """The JSON document in the file at ``path``, checked against ``schema`` when given;
    :class:`SchemaError` naming the file (``file``, default the path) otherwise.
    ``OSError`` (a missing or unreadable file) is the caller's to word."""
    name = str(path) if file is None else file
    value = parse_json(Path(path).read_bytes(), name)
    return validate(schema, value, name) if schema is not None else value
