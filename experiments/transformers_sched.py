"""The mobile-cloud scheduler on measured profiles of real models: RegNetX-400MF and MiniLM.

:func:`scheduler_section` measures the per-block profile of each model on this host (one torch
thread; :mod:`experiments.inference.real_profiles`: time per block, FLOPs per block, the bytes
every cut sends as :func:`fsl.graphsplit.cut_table` counts them, parameters), saves it as
``profiles-<model>.json``, and runs the split-inference fleet of ``fsl run inference`` on it
(:func:`experiments.inference.study.scheduler_study`: 18 Pi 4/5, phones and laptops on
3G/4G/5G/Wi-Fi/Ethernet, a 150 ms target, a batching GPU server, one Pi slowed 3x half-way):
all-cloud, every fixed cut and the latency-aware scheduler. Nothing is scaled: the model's total
is what it measured. Device and server speeds are the declared ones of
:data:`experiments.inference.profiles.DEVICES`.

The section's keys (merged into ``experiments/results/transformers/results.json`` by the
``transformers`` driver): ``scheduler_server_compute_reduction_vs_cloud`` and
``scheduler_sla_attainment`` for the headline model (RegNet), the same per model under
``scheduler_models``, the profile source and the command.

    fsl run transformers-sched [--quick]        # this section alone: scheduler.json in the out folder
    python -m experiments.transformers_sched --reuse   # on the saved profiles, without timing again
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["OUT", "main", "scheduler_section"]

OUT = Path("experiments/results/transformers")
COMMAND = "fsl run transformers (section: experiments.transformers_sched.scheduler_section)"


def _summary(key: str, doc: dict[str, Any], profile: Any, source: str, profile_file: str) -> dict[str, Any]:
    """What results.json keeps of one model's scheduler study."""
    p = doc["policies"]
    sched, cloud = p["scheduler"], p["all-cloud"]
    best = doc["best_fixed_cut"]
    return {
        "model": doc["model"],
        "profile_file": profile_file,
        "profile_source": source,
        "profile_host": profile.host,
        "model_ms_batch1": doc["profile"]["model_ms_batch1"],
        "model_gflops": doc["profile"]["model_flops"] / 1e9,
        "input_bytes": profile.input_bytes,
        "cut_bytes": {c: profile.cut_bytes(c) for c in profile.cuts},
        "server_compute_reduction_vs_cloud": sched["server_compute_reduction_vs_all_cloud"],
        "sla_attainment": sched["attainment"],
        "sla_attainment_all_cloud": cloud["attainment"],
        "sla_attainment_scheduler_no_replan": p["scheduler-no-replan"]["attainment"],
        "p95_ms": {"scheduler": sched["p95_ms"], "all_cloud": cloud["p95_ms"]},
        "local_fraction": sched["local_fraction"],
        "scheduler_cuts": sched["cuts"],
        "attainment_per_device_type": {
            kind: {"scheduler": v["attainment"], "all_cloud": cloud["per_kind"][kind]["attainment"]}
            for kind, v in sched["per_kind"].items()
        },
        "best_fixed_cut": best,
        "best_fixed_cut_attainment": p[best]["attainment"] if best else None,
        "best_fixed_cut_server_compute_reduction": p[best]["server_compute_reduction_vs_all_cloud"] if best else None,
    }


def scheduler_section(
    out: str | Path = OUT,
    *,
    quick: bool = False,
    models: Sequence[str] = ("regnet", "minilm"),
    headline: str = "regnet",
    profiles: Mapping[str, str | Path] | None = None,
    reuse: bool = False,
) -> dict[str, Any]:
    """The scheduler study on measured profiles of real models, as results.json keys.

    Parameters
    ----------
    out : path
        Where ``profiles-<model>.json`` and ``scheduler-<model>.json`` (the full simulation
        result per policy) are written.
    quick : bool
        Fewer batch sizes and repeats when measuring, 20 s of simulated traffic instead of 120 s.
    models : sequence of str
        Keys of :data:`experiments.inference.real_profiles.REAL_MODELS`.
    headline : str
        The model whose figures are the top-level keys.
    profiles : mapping, optional
        ``{model: path}`` of profiles measured earlier (JSON of
        :func:`experiments.inference.real_profiles.save`), used instead of timing the model now.
    reuse : bool
        Use ``out/profiles-<model>.json`` where it exists instead of timing again.
    """
    from experiments.inference import real_profiles
    from experiments.inference.study import scheduler_study

    if headline not in models:
        raise ValueError(f"the headline model {headline!r} is not among {list(models)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    given = {k: Path(v) for k, v in (profiles or {}).items()}
    per_model: dict[str, Any] = {}
    for key in models:
        saved = out / f"profiles-{key}.json"
        if key in given or (reuse and saved.exists()):
            path = given.get(key, saved)
            profile = real_profiles.load(path)
            source = f"measured earlier, read from {path}"
            if path.resolve() != saved.resolve():
                real_profiles.save(profile, saved)
        else:
            t0 = time.perf_counter()
            profile = real_profiles.measure(key, quick=quick)
            source = f"measured in this run ({time.perf_counter() - t0:.0f} s, quick={quick})"
            real_profiles.save(profile, saved)
        doc, _ = scheduler_study(profile, quick)
        doc["profile_source"] = source
        (out / f"scheduler-{key}.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
        per_model[key] = _summary(key, doc, profile, source, str(saved))
    head = per_model[headline]
    return {
        "scheduler_server_compute_reduction_vs_cloud": head["server_compute_reduction_vs_cloud"],
        "scheduler_sla_attainment": head["sla_attainment"],
        "scheduler_sla_attainment_all_cloud": head["sla_attainment_all_cloud"],
        "scheduler_model": headline,
        "scheduler_model_names": {k: v["model"] for k, v in per_model.items()},
        "scheduler_target_ms": doc["target_ms"],
        "scheduler_profile_source": {k: v["profile_source"] for k, v in per_model.items()},
        "scheduler_profile_files": {k: v["profile_file"] for k, v in per_model.items()},
        "scheduler_command": COMMAND,
        "scheduler_quick": quick,
        "scheduler_models": per_model,
    }


def main(args: argparse.Namespace) -> int:
    """``fsl run transformers-sched [--quick]``: the section alone, written to ``OUT/scheduler.json``."""
    quick = bool(getattr(args, "quick", False))
    out = Path(getattr(args, "out", None) or OUT)
    section = scheduler_section(out, quick=quick, reuse=bool(getattr(args, "reuse", False)))
    (out / "scheduler.json").write_text(json.dumps(section, indent=2, default=float) + "\n")
    print(json.dumps({k: v for k, v in section.items() if k != "scheduler_models"}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="use the saved profiles in the out folder")
    ap.add_argument("--out", default=str(OUT))
    raise SystemExit(main(ap.parse_args()))
