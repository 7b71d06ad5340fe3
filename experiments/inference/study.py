"""``fsl run inference``: split inference across device, edge and cloud.

One run directory, five parts, each a JSON file (``inference.json`` has the headline figures and the
per-baseline rows, ``summary.json`` a longer digest):

1. ``profiles.json`` — measured per-block latency/FLOPs/bytes of ``cnn``, ``resnet`` and a real
   RegNetX-400MF (``regnet``, :mod:`experiments.inference.real_profiles`) on this host (1 thread),
   the declared device and network profiles used below.
2. ``scheduler.json`` — a fleet of Raspberry Pi 4/5, phones and laptops on 3G/4G/Wi-Fi sending
   RegNetX-400MF requests (224x224 images) with a latency target, simulated (discrete events,
   batching server) under all-cloud inference, every fixed cut and the latency-aware scheduler
   (re-planning from measured latencies, a Pi slowed down 3x half-way): target attainment,
   latency percentiles per device type, server compute. ``latency_cdf.png`` draws them.
   ``sensitivity.json`` (+ ``decisions.png``): the cut the scheduler picks as a device gets
   faster or its uplink slower. The model's profile is measured, not scaled: the override
   ``profile=FILE`` (``fsl run inference profile=experiments/results/transformers/profiles-regnet.json``)
   reads one measured earlier instead of timing it again on this host.
3. ``validation.json`` — the simulator against real split inference on loopback (real gRPC, real
   compute, batching under budgets; device speed and links emulated): a calibration run fixes
   the per-request software overhead the simulator does not model, a second run with other
   arrivals is compared request by request (share within 20%).
4. ``routing.json`` (+ ``data_map.png``) — data-cartography routing on Fashion-MNIST against
   cloud-only, fixed split, random routing, confidence early exit, adaptive exits and an
   I-SplitEE-style bandit (:func:`experiments.inference.routing.fashion_mnist_routing`).
5. ``provisioning.json`` — stage-wise provisioning from the measured exit fractions of (4) under a
   bursty load, against provisioning every stage for the full load.

``--quick`` runs the same on digits with shorter traces (about a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

# The latency target of the fleet, and the fraction of it the fleet's scheduler keeps free for
# what its model does not predict: the simulation draws every compute and transfer time with 10%
# log-normal jitter.
TARGET_MS = 150.0
HEADROOM = 0.1
# Stage provisioning sizes servers for the multi-exit cnn's stages; the cnn takes well under a
# millisecond per image here, so its measured per-stage profile is scaled to a whole model of
# STAGE_MS per image (the shape measured, the total declared): what a stage costs only scales
# every policy's bill alike, and the comparison is between policies.
STAGE_MS = 30.0


def _profiles(out: Path, quick: bool, regnet_file: str | None = None) -> dict[str, Any]:
    import torch

    from experiments.inference import real_profiles
    from experiments.inference.profiles import DEVICES, NETWORKS, profile_model
    from fsl.models import build_model

    torch.set_num_threads(1)
    reps = 5 if quick else 15
    cnn = profile_model(build_model("cnn", seed=0), (1, 28, 28), batch_sizes=(1, 8, 32), repeats=reps)
    resnet = profile_model(
        build_model("resnet", seed=0, norm="group"), (3, 32, 32), batch_sizes=(1, 8, 32), repeats=reps
    )
    regnet = real_profiles.load(regnet_file) if regnet_file else real_profiles.measure("regnet", quick=quick)
    doc = {
        "cnn": cnn.to_dict(),
        "resnet": resnet.to_dict(),
        "regnet": regnet.to_dict(),
        "regnet_source": f"read from {regnet_file}" if regnet_file else "measured in this run",
        "devices": {k: v.to_dict() for k, v in DEVICES.items()},
        "networks": {k: v.to_dict() for k, v in NETWORKS.items()},
    }
    (out / "profiles.json").write_text(json.dumps(doc, indent=2) + "\n")
    return {"cnn": cnn, "resnet": resnet, "regnet": regnet}


def _fleet(target_ms: float, rate_hz: float, slow_from_ms: float | None) -> list[Any]:
    from experiments.inference.profiles import DEVICES, NETWORKS
    from experiments.inference.simulate import SimDevice

    kinds = [("pi4", "wifi"), ("pi4", "4g"), ("pi5", "wifi"), ("pi5", "4g"), ("phone", "4g"), ("phone", "5g"),
             ("phone", "3g"), ("laptop", "wifi"), ("laptop", "ethernet")]  # fmt: skip
    fleet = []
    for i, (dev, net) in enumerate(kinds * 2):
        slow = 3.0 if (slow_from_ms is not None and i == 0) else 1.0
        fleet.append(
            SimDevice(
                f"{dev}-{net}-{i}",
                DEVICES[dev],
                NETWORKS[net],
                target_ms=target_ms,
                rate_hz=rate_hz,
                slowdown=slow,
                slowdown_from_ms=slow_from_ms or 0.0,
            )
        )
    return fleet


def scheduler_study(
    profile: Any, quick: bool, target_ms: float = TARGET_MS, fixed: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fleet's requests for ``profile``'s model, simulated under every policy.

    Policies: all-cloud, each fixed cut (``fixed``), the scheduler and the scheduler without
    re-planning. Returns the result document (per policy: attainment, latency percentiles per
    device type, server compute and its reduction against all-cloud) and the raw simulation
    results by policy. The profile is used as measured.
    """
    from experiments.inference.profiles import DEVICES
    from experiments.inference.scheduler import Scheduler
    from experiments.inference.simulate import (
        FixedCut,
        SchedulerPolicy,
        SimServerConfig,
        all_cloud,
        simulate,
        summarize_simulation,
    )

    duration = 20_000.0 if quick else 120_000.0
    server = SimServerConfig(device=DEVICES["gpu-server"], workers=1, max_batch=32, max_wait_ms=5.0)
    fleet = _fleet(target_ms, rate_hz=5.0, slow_from_ms=duration / 2)
    runs: dict[str, Any] = {}
    results: dict[str, Any] = {}
    policies: dict[str, Any] = {"all-cloud": all_cloud()}
    for cut in profile.cuts if fixed else ():
        if cut != "input":
            policies[f"fixed-{cut}"] = FixedCut(cut)
    policies["scheduler"] = SchedulerPolicy(Scheduler(profile, server.device, headroom=HEADROOM))
    policies["scheduler-no-replan"] = SchedulerPolicy(Scheduler(profile, server.device, headroom=HEADROOM), learn=False)
    for name, pol in policies.items():
        res = simulate(profile, fleet, pol, server, duration, seed=0, jitter=0.1)
        results[name] = res
        runs[name] = summarize_simulation(res)
    cloud = runs["all-cloud"]
    for s in runs.values():
        s["server_compute_reduction_vs_all_cloud"] = 1.0 - s["server_ms_total"] / cloud["server_ms_total"]
    fixed_runs = {k: v for k, v in runs.items() if k.startswith("fixed-")}
    best_fixed = max(
        fixed_runs, key=lambda k: (fixed_runs[k]["attainment"], -fixed_runs[k]["server_ms_total"]), default=None
    )
    doc = {
        "model": profile.notes.get("model", "measured profile"),
        "profile": {
            "host": profile.host,
            "threads": profile.threads,
            "batch_sizes": profile.batch_sizes,
            "model_ms_batch1": profile.blocks_ms(profile.blocks, 1),
            "model_flops": profile.flops(profile.blocks),
            "scaled": False,
            "input_bytes": profile.input_bytes,
            "notes": profile.notes,
        },
        "headroom": HEADROOM,
        "target_ms": target_ms,
        "duration_ms": duration,
        "fleet": [{"name": d.name, "device": d.device.name, "network": d.network.name} for d in fleet],
        "server": {"device": server.device.name, "max_batch": server.max_batch, "max_wait_ms": server.max_wait_ms},
        "slowdown": {"device": fleet[0].name, "factor": 3.0, "from_ms": duration / 2},
        "best_fixed_cut": best_fixed,
        "policies": runs,
    }
    return doc, results


def _scheduler(out: Path, profile: Any, quick: bool) -> dict[str, Any]:
    doc, results = scheduler_study(profile, quick)
    (out / "scheduler.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    _plot_cdf(out / "latency_cdf.png", {k: results[k] for k in ("all-cloud", "scheduler")}, doc["target_ms"])
    return doc


def _sensitivity(out: Path, profile: Any) -> dict[str, Any]:
    """How the scheduler's decision moves when a device gets faster or its network slower."""
    from dataclasses import replace

    from experiments.inference.profiles import DEVICES, NETWORKS
    from experiments.inference.scheduler import Scheduler

    target = 100.0  # tighter than the fleet's 150 ms, so that a Pi 4 at its declared speed has a cut to choose
    server = DEVICES["gpu-server"]
    speed_factors = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    bandwidth_factors = [4.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.02]
    cases = [("pi4", "wifi"), ("pi5", "4g"), ("phone", "4g"), ("laptop", "wifi")]

    def row(dev: Any, net: Any) -> dict[str, Any]:
        plan = Scheduler(profile, server).plan(dev, net, target)  # a fresh scheduler: declared figures only
        return {
            "cut": plan.cut,
            "cut_index": profile.cuts.index(plan.cut),
            "predicted_ms": plan.predicted_ms,
            "server_ms": plan.server_ms,
            "feasible": plan.feasible,
        }

    doc: dict[str, Any] = {"target_ms": target, "cuts": profile.cuts, "device_speed": {}, "network_bandwidth": {}}
    for d, n in cases:
        dev, net = DEVICES[d], NETWORKS[n]
        doc["device_speed"][f"{d}-{n}"] = [
            {"speed_factor": f, "speed": dev.speed * f, **row(replace(dev, speed=dev.speed * f), net)}
            for f in speed_factors
        ]
        doc["network_bandwidth"][f"{d}-{n}"] = [
            {"bandwidth_factor": f, "bandwidth_mbps": net.bandwidth_mbps * f,
             **row(dev, net.with_(bandwidth_mbps=net.bandwidth_mbps * f))}
            for f in bandwidth_factors
        ]  # fmt: skip
    # the decision must move towards the device as it gets faster, and away from the server as the link slows
    doc["moves_with_device_speed"] = (
        all(rows[-1]["cut_index"] > rows[0]["cut_index"] for rows in doc["device_speed"].values())
        and all(  # never back towards the server as the device gets faster
            b["cut_index"] >= a["cut_index"]
            for rows in doc["device_speed"].values()
            for a, b in zip(rows, rows[1:], strict=False)
        )
    )
    doc["moves_with_network"] = any(
        rows[-1]["cut_index"] != rows[0]["cut_index"] for rows in doc["network_bandwidth"].values()
    )
    (out / "sensitivity.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    _plot_sensitivity(out / "decisions.png", doc)
    return doc


def _short(cut: str) -> str:
    """A module path as a tick label: ``regnet.encoder.stages.2.layers.3`` -> ``s2.l3``."""
    for prefix in ("regnet.encoder.", "regnet.", "bert.encoder.", "bert."):
        cut = cut.removeprefix(prefix)
    return cut.replace("stages.", "s").replace(".layers.", ".l").replace("layer.", "l")


def _plot_sensitivity(path: Path, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for name, rows in doc["device_speed"].items():
        axes[0].plot([r["speed_factor"] for r in rows], [r["cut_index"] for r in rows], marker="o", label=name)
    for name, rows in doc["network_bandwidth"].items():
        axes[1].plot([r["bandwidth_factor"] for r in rows], [r["cut_index"] for r in rows], marker="o", label=name)
    axes[0].set_xscale("log")
    axes[1].set_xscale("log")
    axes[1].invert_xaxis()
    axes[0].set_xlabel("device speed (x declared)")
    axes[1].set_xlabel("uplink bandwidth (x declared; slower to the right)")
    axes[0].set_yticks(range(len(doc["cuts"])), [_short(c) for c in doc["cuts"]], fontsize=7)
    axes[0].set_ylabel("cut chosen (blocks on the device)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"scheduler decision, target {doc['target_ms']:.0f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_cdf(path: Path, results: dict[str, Any], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = sorted({r.kind for res in results.values() for r in res.records})
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3), sharey=True)
    for ax, kind in zip(np.atleast_1d(axes), kinds, strict=True):
        for (name, res), style in zip(results.items(), ("--", "-"), strict=False):
            lat = np.sort([r.latency_ms for r in res.records if r.kind == kind])
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), style, label=name)
        ax.axvline(target, color="grey", lw=0.8)
        ax.set_title(kind)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
    np.atleast_1d(axes)[0].set_ylabel("fraction of requests")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _validation(out: Path, profile: Any, quick: bool) -> dict[str, Any]:
    import torch

    from experiments.inference.loopback import PerDevice, run_loopback
    from experiments.inference.profiles import DEVICES, INPUT, NETWORKS
    from experiments.inference.simulate import SimDevice, SimServerConfig, simulate, validate
    from fsl.models import build_model

    torch.set_num_threads(1)
    model = build_model("cnn", seed=0).eval()
    host = dataclasses.replace(DEVICES["edge"], name="this-host", speed=1.0)
    server = SimServerConfig(device=host, workers=1, max_batch=16, max_wait_ms=5.0)
    mix = [("pi4", "wifi", "conv1"), ("pi5", "4g", "conv2"), ("phone", "4g", INPUT), ("laptop", "wifi", "conv1"),
           ("pi4", "3g", "fc1"), ("pi5", "wifi", INPUT), ("phone", "5g", "conv1"), ("laptop", "ethernet", INPUT)]  # fmt: skip
    fleet = [
        SimDevice(f"{d}-{n}-{i}", DEVICES[d], NETWORKS[n], target_ms=300.0, rate_hz=5.0)
        for i, (d, n, _) in enumerate(mix)
    ]
    policy = PerDevice({f.name: c for f, (_, _, c) in zip(fleet, mix, strict=True)})
    duration = 4_000.0 if quick else 10_000.0
    x = torch.rand(64, 1, 28, 28)

    def paired(seed: int, offset: float) -> tuple[list[float], list[float], list[Any]]:
        real = run_loopback(model, (1, 28, 28), profile, fleet, policy, server, duration, x, seed=seed)
        sim = simulate(profile, fleet, policy, server, duration, seed=seed)
        s = sorted(sim.records, key=lambda r: (r.device, r.arrival_ms))
        if len(s) != len(real):
            raise RuntimeError(f"simulated {len(s)} requests, measured {len(real)}")
        return [r.latency_ms + offset for r in s], [r.latency_ms for r in real], real

    pred0, meas0, _ = paired(seed=11, offset=0.0)
    offset = statistics.median(m - p for p, m in zip(pred0, meas0, strict=True))  # calibration run
    pred, meas, real = paired(seed=12, offset=offset)  # held-out arrivals
    raw = [p - offset for p in pred]
    per_device = {}
    for name in sorted({r.device for r in real}):
        idx = [i for i, r in enumerate(real) if r.device == name]
        per_device[name] = {
            "cut": real[idx[0]].cut,
            "measured_ms_mean": statistics.fmean(meas[i] for i in idx),
            "predicted_ms_mean": statistics.fmean(pred[i] for i in idx),
        }
    doc = {
        "model": "cnn (1x28x28)",
        "server": "split servers on this host (one per cut), InferBatcher max 16 samples / 5 ms",
        "overhead_ms_calibrated": offset,
        "uncalibrated": validate(raw, meas),
        "calibrated": validate(pred, meas),
        "per_device": per_device,
        "requests": len(meas),
    }
    (out / "validation.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _provisioning(out: Path, routing: dict[str, Any], profile: Any, quick: bool) -> dict[str, Any]:
    from experiments.inference.provisioning import compare, load_from_trace, stages_from_exit_fractions
    from experiments.inference.simulate import bursty_trace

    # SERFLOW's setting: every stage runs on servers and ends in an exit; a request leaves at the
    # first exit sure enough (the exit fractions the tuned confidence exits measured in part 4)
    frac = routing["comparison"]["policies"]["adaptive-exit"]["tier_fractions"]
    fractions = [float(frac[k]) for k in ("device", "edge", "cloud")]
    scaled = profile.scaled(STAGE_MS / profile.blocks_ms(profile.blocks, 1))
    service = [scaled.blocks_ms(b, 1) for b in (["conv1"], ["conv2"], ["fc1", "fc2"])]  # ms per request
    stages = stages_from_exit_fractions(["conv1+exit", "conv2+exit", "fc1+fc2"], service, fractions)
    duration = 3_600_000.0 if not quick else 600_000.0
    trace = bursty_trace(duration, base_rate_hz=50.0, burst_rate_hz=400.0, mean_burst_ms=60_000.0,
                         mean_calm_ms=240_000.0, seed=0)  # fmt: skip
    load = load_from_trace(trace, window_s=60.0, duration_ms=duration)
    doc = compare(stages, load, window_s=60.0)
    full = doc["policies"]["always-on only"]["full"]["cost"]  # every stage sized for the full load
    doc["baseline"] = "always-on servers, every stage provisioned for the full load"
    doc["reduction_vs_baseline"] = {k: 1.0 - v["exit_aware"]["cost"] / full for k, v in doc["policies"].items()}
    doc["best_reduction_vs_baseline"] = max(doc["reduction_vs_baseline"].values())
    doc["exit_fractions"] = dict(zip(("device", "edge", "cloud"), fractions, strict=True))
    doc["trace"] = {
        "requests": len(trace),
        "duration_s": duration / 1000.0,
        "peak_rps": max(load),
        "mean_rps": statistics.fmean(load),
    }
    (out / "provisioning.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    return doc


def main(args: argparse.Namespace) -> int:
    from experiments.inference.routing import fashion_mnist_routing
    from fsl.rundir import RunDir

    quick = bool(getattr(args, "quick", False))
    options = dict(o.split("=", 1) for o in getattr(args, "overrides", None) or [] if "=" in o)
    unknown = sorted(set(options) - {"profile"})
    if unknown or len(options) != len(getattr(args, "overrides", None) or []):
        print(
            f"error: `fsl run inference` takes only profile=FILE (a measured RegNet profile), not {unknown or args.overrides}"
        )
        return 2
    root = RunDir.create("runs", "inference-quick" if quick else "inference").path
    print(f"run directory: {root}")
    t0 = time.perf_counter()
    prof = _profiles(root, quick, options.get("profile"))
    print(f"[1/5] profiles ({time.perf_counter() - t0:.0f}s)")
    sched = _scheduler(root, prof["regnet"], quick)
    sens = _sensitivity(root, prof["regnet"])
    print(f"[2/5] scheduler ({time.perf_counter() - t0:.0f}s)")
    val = _validation(root, prof["cnn"], quick)
    print(f"[3/5] simulator validation ({time.perf_counter() - t0:.0f}s)")
    if quick:
        routing = fashion_mnist_routing(root, dataset="digits", val_size=300, epochs=3, max_drop_points=1.0)
    else:
        routing = fashion_mnist_routing(root)
    print(f"[4/5] routing ({time.perf_counter() - t0:.0f}s)")
    prov = _provisioning(root, routing, prof["cnn"], quick)
    print(f"[5/5] provisioning ({time.perf_counter() - t0:.0f}s)")
    p = sched["policies"]
    table = routing["comparison"]["policies"]
    summary = {
        "experiment": "inference",
        "quick": quick,
        "scheduler": {
            name: {
                "attainment": p[name]["attainment"],
                "server_compute_reduction_vs_all_cloud": p[name]["server_compute_reduction_vs_all_cloud"],
                "p95_ms": p[name].get("p95_ms"),
            }
            for name in p
        },
        "validation_within_20pct": val["calibrated"]["within_20pct"],
        "validation_within_20pct_uncalibrated": val["uncalibrated"]["within_20pct"],
        "validation_overhead_ms": val["overhead_ms_calibrated"],
        "routing": {
            k: {
                "accuracy": v["accuracy"],
                "accuracy_drop_points": v["accuracy_drop_points"],
                "cost_reduction_pct": v["cost_reduction_pct"],
            }
            for k, v in table.items()
        },  # fmt: skip
        "provisioning_best_policy": prov.get("best"),
        "provisioning_reduction": prov["best_reduction_vs_baseline"],  # vs every stage always-on for full load
        "provisioning_reduction_same_policy": {k: v["reduction"] for k, v in prov["policies"].items()},
        "wall_s": time.perf_counter() - t0,
    }
    summary["sensitivity"] = {
        "moves_with_device_speed": sens["moves_with_device_speed"],
        "moves_with_network": sens["moves_with_network"],
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    carto, cloud = table["cartography"], table["cloud-only"]
    headline = {
        "scheduler_model": sched["model"],
        "server_compute_reduction_vs_cloud": p["scheduler"]["server_compute_reduction_vs_all_cloud"],
        "sla_attainment": {"scheduler": p["scheduler"]["attainment"], "all_cloud": p["all-cloud"]["attainment"]},
        "latency_p95_ms": {"scheduler": p["scheduler"]["p95_ms"], "all_cloud": p["all-cloud"]["p95_ms"]},
        "latency_per_device_type": {name: p[name]["per_kind"] for name in ("scheduler", "all-cloud")},  # fmt: skip
        "dc_cost_reduction_vs_cloud": carto["cost_reduction_pct"] / 100.0,
        "dc_accuracy_drop_points": carto["accuracy_drop_points"],
        "dc_cloud_accuracy": cloud["accuracy"],
        "provisioning_cost_reduction": prov["best_reduction_vs_baseline"],
        "provisioning_best_policy": prov.get("best"),
        "latency_prediction_error": val["calibrated"]["median_rel_error"],
        "latency_prediction_error_uncalibrated": val["uncalibrated"]["median_rel_error"],
        "latency_prediction_within_20pct": val["calibrated"]["within_20pct"],
        "scheduler_baselines": [{"policy": k, **v} for k, v in summary["scheduler"].items()],
        "routing_baselines": [{"policy": k, **v} for k, v in summary["routing"].items()],
        "provisioning_policies": [
            {
                "policy": k,
                "exit_aware_cost": v["exit_aware"]["cost"],
                "full_cost": v["full"]["cost"],
                "reduction_same_policy": v["reduction"],
                "reduction_vs_baseline": prov["reduction_vs_baseline"][k],
            }
            for k, v in prov["policies"].items()
        ],  # fmt: skip
        "sensitivity": summary["sensitivity"],
        "quick": quick,
    }
    (root / "inference.json").write_text(json.dumps(headline, indent=2, default=float) + "\n")
    print(json.dumps(summary, indent=2, default=float))
    return 0
