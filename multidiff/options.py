"""Typed option sets: one definition gives each key's type, default, help line and rules.

An option set is a frozen dataclass deriving from :class:`Options`. Each field's attribute
docstring is its help line; its annotation is its type; :meth:`Options.rules` adds the checks a
type cannot say. Construction checks every value, :meth:`Options.from_mapping` refuses unknown
keys, and :meth:`Options.describe` gives the rows that ``--help`` and ``docs/options.md`` print,
so what the help says and what is validated come from the same place and cannot drift.

A field whose default is :data:`REQUIRED` (omegaconf's ``???``) must be given.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal, NamedTuple

REQUIRED = "???"
"""The default of an option that has none: the user must give it (omegaconf's missing value)."""


class OptionError(ValueError):
    """An option is unknown, missing or invalid; the message names the key and the fix."""


class OptionRow(NamedTuple):
    """One option as ``--help`` and the docs show it."""

    key: str
    type: str
    default: Any
    help: str


class Options:
    """Base of a frozen dataclass of options (see the module docstring).

    ``PREFIX`` is prepended to every key in messages and descriptions (``training.`` for the
    training options); ``WHERE`` says where the options are documented (for the unknown-key error).
    """

    PREFIX: ClassVar[str] = ""
    WHERE: ClassVar[str] = "--help lists them"

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # messages echo the input
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key = self.PREFIX + f.name
            if isinstance(given[f.name], str) and given[f.name] == REQUIRED:
                what = _field_docs(type(self)).get(f.name, "").rstrip(".")
                raise OptionError(f"missing {key}=...: {what}" if what else f"missing {key}=...")
            object.__setattr__(self, f.name, _typed(key, given[f.name], hints[f.name]))
        for name, ok, what in self.rules():
            if not ok:
                raise OptionError(f"{self.PREFIX}{name}={given[name]!r} is invalid: it must be {what}")

    def rules(self) -> Iterable[tuple[str, bool, str]]:
        """``(field, holds, what it must be)`` for the checks beyond the types (override)."""
        return ()

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, *, only_known: bool = False):
        """Options from a mapping (a dict or a DictConfig; missing keys take the defaults).

        Unknown keys are refused, naming the known ones; ``only_known=True`` picks this set's keys
        out of a larger mapping (the top level of a composed config) instead.
        """
        from omegaconf import DictConfig, OmegaConf

        if isinstance(values, DictConfig):
            values = OmegaConf.to_container(values, resolve=True, throw_on_missing=False)
        values, known = dict(values or {}), cls.keys()
        if only_known:
            values = {k: v for k, v in values.items() if k in known}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise OptionError(f"unknown key {cls.PREFIX}{unknown[0]}: the options here are "
                              f"{', '.join(cls.PREFIX + k for k in known)} ({cls.WHERE}); check the spelling")
        return cls(**values)

    @classmethod
    def describe(cls) -> list[OptionRow]:
        """One :class:`OptionRow` per field, in definition order."""
        docs, hints = _field_docs(cls), _hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if f.name not in docs:
                raise TypeError(f"{cls.__name__}.{f.name} has no help line: write a docstring under the field")
            rows.append(OptionRow(cls.PREFIX + f.name, type_name(hints[f.name]), default, docs[f.name]))
        return rows


def format_value(value: Any) -> str:
    """A value as it is written on the command line (``null``, ``true``, ``[a, b]``, ``{}``)."""
    if value is None:
        return "null"
    if value == REQUIRED:
        return "(required)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def type_name(hint: Any) -> str:
    """``int``, ``str|null``, ``stop|skip``, ``list[str]`` ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(map(str, args))
    if isinstance(hint, types.UnionType):
        return "|".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]" if args else "list"
    return getattr(hint, "__name__", str(hint))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass and its bases (one line each), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


_WHAT = {int: "an integer", float: "a number", bool: "true or false", dict: "a mapping {key: value}",
         str: "text", list: "a list [a, b, ...]"}


def _what(hint: Any) -> str:
    return _WHAT.get(typing.get_origin(hint) or hint, type_name(hint))


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint``; :class:`OptionError` naming ``key`` otherwise.

    An int is a valid float. A number is valid text: the command line's parser reads ``prompt=7``
    as the integer 7, which is the user's text all the same.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise OptionError(f"{key}={value!r} is invalid: choose one of {', '.join(map(str, args))}")
        return value
    if isinstance(hint, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) > 1:  # e.g. list[str] | str: the first that takes the value
            for choice in choices:
                try:
                    return _typed(key, value, choice)
                except OptionError:
                    pass
            raise OptionError(f"{key}={value!r} is invalid: it must be {' or '.join(_what(c) for c in choices)}")
        (hint,) = choices
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise OptionError(f"{key}={value!r} is invalid: it must be {_WHAT[list]}")
        return [_typed(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise OptionError(f"{key}={value!r} is invalid: it must be {_WHAT[hint]}")
    return value
