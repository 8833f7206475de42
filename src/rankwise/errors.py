"""The one exception type for bad input from the user.

``ConfigError`` is raised for anything the user can fix by changing what they
gave rankwise: a config key or value, a path, a data row, a run directory. The
CLI prints it as one line (``rankwise VERB: error: ...``) and exits with 2; any
other exception is a bug in rankwise and keeps its traceback.

It subclasses ``ValueError`` so callers that caught ``ValueError`` before keep
working.

Helpers for writing those lines: ``one_line`` (an exception's message, collapsed and
capped), ``short`` (a bounded ``repr`` of a user's value, however large or deeply
aliased) and ``read_json_object`` (a user's JSON file, every problem a ``ConfigError``).
"""
from __future__ import annotations

import json
import reprlib


class ConfigError(ValueError):
    """Bad input from the user (config, paths, data): printed by the CLI as one line."""


def one_line(e, limit: int = 300) -> str:
    """An exception (or text) as one line for a ``ConfigError``: whitespace collapsed, at most ``limit``
    characters (cut with ``...``); an empty message gives the exception's type name."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__ if isinstance(e, BaseException) else ""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def short(value, limit: int = 80) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters, in bounded time.

    Nested containers are shown to a few levels and items only (``reprlib``), so a value
    built from YAML aliases that expands to billions of items is never formatted whole.
    """
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset, r.maxfrozenset = 3, 4, 4, 4, 4, 4
    r.maxstring, r.maxlong, r.maxother = limit, limit, limit
    try:
        text = r.repr(value)
    except ValueError:  # an int past Python's digit limit for str(): say how big it is instead
        text = f"<an int of {value.bit_length()} bits>" if isinstance(value, int) else f"<a {type(value).__name__}>"
    return one_line(text, limit)


def read_json_object(path) -> dict:
    """The JSON object in the user's file ``path``; an unreadable file, bad JSON (or nesting too deep to
    read) or another JSON value is a ``ConfigError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise ConfigError(f"{path}: not a readable JSON file ({one_line(e, 200)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a readable JSON file (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
