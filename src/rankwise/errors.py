"""The one exception type for bad input from the user.

``ConfigError`` is raised for anything the user can fix by changing what they
gave rankwise: a config key or value, a path, a data row, a run directory. The
CLI prints it as one line (``rankwise VERB: error: ...``) and exits with 2; any
other exception is a bug in rankwise and keeps its traceback.

It subclasses ``ValueError`` so callers that caught ``ValueError`` before keep
working.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """Bad input from the user (config, paths, data): printed by the CLI as one line."""
