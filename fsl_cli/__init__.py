"""The ``fsl`` command line: the top of the layers, the one package that may import every role.

The library (:mod:`fsl`), the two roles (:mod:`server`, :mod:`clients`), the attacks and the
experiments never import each other upwards (the layer contract in ``pyproject.toml``); the
commands that start a server, a client or a study live here so that none of those packages has
to reach into another.
"""

from __future__ import annotations

from fsl_cli.main import main

__all__ = ["main"]
