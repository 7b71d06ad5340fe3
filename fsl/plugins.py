"""Plug-ins named by import string, resolved the same way wherever a role runs.

An experiment names code it wants run inside a role by an import string such as
``"attacks.ground_truth:capture_hooks"`` (``package.module:attribute``, the attribute may be dotted).
The string travels in the experiment config, so the driver, simulation workers and SuperNodes
all resolve it here, and a layer that runs a plug-in never imports the layer that provides it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PluginError", "resolve"]


class PluginError(ValueError):
    """An import string that does not name an importable object."""


def resolve(spec: str) -> Any:
    """The object ``"package.module:attribute"`` names; :class:`PluginError` says what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{spec!r} is not an import string of the form 'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(f"{spec!r}: cannot import {module_name!r} ({e})") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise PluginError(f"{spec!r}: {module_name!r} has no attribute {attr!r}") from e
    return obj
