"""Plug-ins named by import string, resolved the same way wherever a role runs.

An experiment names code it wants run inside a role by an import string such as
``"attacks.ground_truth:capture_hooks"`` (``package.module:attribute``, the attribute may be dotted).
The string travels in the experiment config, so the driver, simulation workers and SuperNodes
all resolve it here, and a layer that runs a plug-in never imports the layer that provides it.

The module part may also be a Python file, ``"examples/custom_model/my_model.py:build"``: relative
to the working directory the run was started in (simulation workers share it), loaded once per
process. That names a user's code that is not an installed package without touching ``sys.path``
(and without clashing with a same-named package: opacus, for one, installs a top-level ``examples``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["PluginError", "resolve"]


class PluginError(ValueError):
    """An import string that does not name an importable object."""


def resolve(spec: str) -> Any:
    """The object ``"package.module:attribute"`` names; :class:`PluginError` says what is wrong."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{spec!r} is not an import string of the form 'package.module:name' or 'file.py:name'")
    obj: Any
    if module_name.endswith(".py"):
        obj = _load_file(spec, Path(module_name))
    else:
        try:
            obj = importlib.import_module(module_name)
        except ImportError as e:
            raise PluginError(f"{spec!r}: cannot import {module_name!r} ({e})") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise PluginError(f"{spec!r}: {module_name!r} has no attribute {attr!r}") from e
    return obj


def _load_file(spec: str, path: Path) -> ModuleType:
    """The module in Python file ``path``, executed once per process (its name derives from the absolute path)."""
    path = path.resolve()
    if not path.is_file():
        raise PluginError(f"{spec!r}: no file {path} (a relative path is taken from the working directory)")
    name = f"fsl_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise PluginError(f"{spec!r}: {path} is not a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # before executing: dataclasses and pickling look the module up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise PluginError(f"{spec!r}: importing {path} failed ({type(e).__name__}: {e})") from e
    return module
