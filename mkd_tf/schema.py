"""One declared schema per file the project reads, and the one check every reader runs on load.

A schema is a plain dict ``key -> spec``; a spec says the value's type, its range and, for a mapping or
a list, the spec of what it holds. :func:`validate` walks a loaded file against it and fails with one
line naming the file and the first key that is missing or wrong (``key 'classes' must be a list of
strings, got int``), so no reader meets a value it did not expect. Cross-checks between keys (label
values against classes, byte counts against slice counts) are plain functions next to each schema;
they run after :func:`validate`, on data whose types are then known.

A leaf may also be a :class:`mkd_tf.rules.Rule` (the type and range of a config setting), so the
config file's rules and every other file's schema read the same way.

Example:
    >>> schema = {"size": integer(1), "classes": strings(min_length=1), "note": text(required=False)}
    >>> validate("m.json", {"size": 32, "classes": ["background", "heart"]}, schema)
    >>> validate("m.json", {"size": 32, "classes": 3}, schema)
    Traceback (most recent call last):
    mkd_tf.errors.MkdError: m.json: key 'classes' must be a list of strings, got int
    >>> validate("m.json", {"classes": ["background"]}, schema)
    Traceback (most recent call last):
    mkd_tf.errors.MkdError: m.json: key 'size' is missing
"""

import math

from mkd_tf.errors import fail
from mkd_tf.rules import Rule

_TYPE_NAMES = {
    "str": "a string",
    "int": "a whole number",
    "number": "a number",
    "bool": "true or false",
    "list": "a list",
    "mapping": "a mapping",
    "any": "a value",
}
_PLURAL = {
    "str": "strings",
    "int": "whole numbers",
    "number": "numbers",
    "bool": "true/false values",
    "list": "lists",
    "mapping": "mappings",
    "any": "values",
}


class Spec:
    """What one key must hold.

    Args:
        kind: "str", "int", "number", "bool", "list", "mapping" or "any".
        required: the key must be present.
        nullable: ``null`` is allowed.
        low, high: inclusive bounds of a number (``low_open``: exclusive low bound).
        choices: the allowed values.
        items: the spec of each element of a list.
        length: a list's exact length; ``min_length``: its least length.
        keys: a mapping's known keys (a nested schema); other keys are allowed and ignored.
        values: the spec of every value of a mapping with free keys (e.g. name -> label value).
    """

    def __init__(
        self,
        kind,
        required=True,
        nullable=False,
        low=None,
        high=None,
        low_open=False,
        choices=None,
        items=None,
        length=None,
        min_length=0,
        keys=None,
        values=None,
    ):
        self.kind, self.required, self.nullable = kind, required, nullable
        self.low, self.high, self.low_open, self.choices = low, high, low_open, choices
        self.items, self.length, self.min_length = items, length, min_length
        self.keys, self.values = keys, values

    def describe(self):
        """What the value must be, e.g. "a list of strings"."""
        if self.kind == "list" and self.items is not None and self.items.kind not in ("list", "mapping", "any"):
            described = f"a list of {_PLURAL[self.items.kind]}"
        else:
            described = _TYPE_NAMES[self.kind]
        return f"{described} or null" if self.nullable else described


def text(**options):
    """A string."""
    return Spec("str", **options)


def integer(low=None, high=None, **options):
    """A whole number in ``[low, high]`` (JSON true/false is not one)."""
    return Spec("int", low=low, high=high, **options)


def number(low=None, high=None, **options):
    """A finite number in ``[low, high]`` (``low_open=True``: ``(low, high]``)."""
    return Spec("number", low=low, high=high, **options)


def boolean(**options):
    """true or false."""
    return Spec("bool", **options)


def listing(items=None, **options):
    """A list, each element matching ``items``."""
    return Spec("list", items=items, **options)


def strings(**options):
    """A list of strings."""
    return Spec("list", items=Spec("str"), **options)


def numbers(length=None, low=None, low_open=False, **options):
    """A list of ``length`` finite numbers, each >= ``low`` (``low_open``: > ``low``)."""
    return Spec("list", items=Spec("number", low=low, low_open=low_open), length=length, **options)


def mapping(keys=None, values=None, **options):
    """A mapping with the known ``keys`` (a nested schema) or free keys whose ``values`` match a spec."""
    return Spec("mapping", keys=keys, values=values, **options)


def anything(**options):
    """Any value (the key must still be present unless ``required=False``)."""
    return Spec("any", **options)


def type_name(value):
    """The JSON-ish name of ``value``'s type, for messages ("int", "str", "list", "mapping", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_ok(kind, value):
    if kind == "any":
        return True
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return _is_number(value) and float(value).is_integer()
    if kind == "number":
        return _is_number(value) and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "list":
        return isinstance(value, list)
    return isinstance(value, dict)


def problem_of(value, spec, key=""):
    """``(key, problem)`` of the first thing wrong with ``value`` against ``spec``, or `None`.

    ``key`` is the dotted name of ``value`` in the file (``modalities.target.volumes[0].case_id``).
    """
    if isinstance(spec, Rule):
        problem = spec.problem(value)
        return (key, problem) if problem else None
    if value is None:
        return None if spec.nullable else (key, f"must be {spec.describe()}, got null")
    if not _type_ok(spec.kind, value):
        got = type_name(value)
        if spec.kind in ("int", "number") and _is_number(value):
            got = repr(value)  # a float where a whole number is needed, or NaN/inf
        return key, f"must be {spec.describe()}, got {got}"
    if spec.kind in ("int", "number"):
        too_low = spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low)
        too_high = spec.high is not None and value > spec.high
        if too_low or too_high:
            left, low = ("(" if spec.low_open else "["), ("-inf" if spec.low is None else spec.low)
            return key, f"must be in {left}{low}, {'inf' if spec.high is None else spec.high}], got {value!r}"
    if spec.choices is not None and value not in spec.choices:
        return key, f"must be one of {', '.join(map(str, spec.choices))}, got {value!r}"
    if spec.kind == "list":
        if spec.length is not None and len(value) != spec.length:
            return key, f"must hold {spec.length} values, got {len(value)}"
        if len(value) < spec.min_length:
            return key, "must not be empty" if spec.min_length == 1 else f"must hold at least {spec.min_length} values"
        if spec.items is not None:
            for index, item in enumerate(value):
                found = problem_of(item, spec.items, f"{key}[{index}]")
                if found:
                    return found
    if spec.kind == "mapping":
        if spec.keys is not None:
            found = schema_problem(value, spec.keys, key)
            if found:
                return found
        if spec.values is not None:
            for name, item in value.items():
                found = problem_of(item, spec.values, f"{key}.{name}" if key else str(name))
                if found:
                    return found
    return None


def schema_problem(data, schema, prefix=""):
    """``(key, problem)`` of the first key of the mapping ``data`` that ``schema`` refuses, or `None`."""
    for name, spec in schema.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            required = spec.required if isinstance(spec, Spec) else not spec.optional
            if required:
                return key, "is missing"
            continue
        found = problem_of(data[name], spec, key)
        if found:
            return found
    return None


def validate(path, data, schema, noun="key"):
    """Fail with one line naming ``path`` and the first key of ``data`` that ``schema`` refuses.

    Args:
        path: the file (for the message).
        data: the loaded file (a JSON object / YAML mapping).
        schema: ``key -> Spec`` (or :class:`~mkd_tf.rules.Rule`), nested through :func:`mapping`.
        noun: how the message names a key ("key"; a config file says "setting").

    Raises:
        MkdError: ``PATH: key 'K' is missing`` or ``PATH: key 'K' must be ..., got ...``.
    """
    if not isinstance(data, dict):
        fail(path, f"must hold a mapping of keys, got {type_name(data)}")
    found = schema_problem(data, schema)
    if found:
        key, problem = found
        fail(path, f"{noun} '{key}' {problem}")
