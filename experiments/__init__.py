"""Experiments: TOML definitions and the sweeps ``fsl run NAME`` runs from ``NAME.py``."""

from __future__ import annotations

import argparse


def argv_from_run(args: argparse.Namespace, prefix: str) -> list[str]:
    """The command-line flags of a study's own parser from ``fsl run NAME [--quick] PREFIX.key=value ...``:
    ``--quick`` stays, ``PREFIX.key=value`` becomes ``--key value``; any other override is refused."""
    argv = ["--quick"] if getattr(args, "quick", False) else []
    for o in getattr(args, "overrides", []) or []:
        key, sep, value = o.partition("=")
        if not sep or not key.startswith(prefix + "."):
            raise SystemExit(f"error: {o!r}: this study takes only --quick and {prefix}.KEY=VALUE options")
        argv += ["--" + key[len(prefix) + 1 :].replace("_", "-"), value]
    return argv
