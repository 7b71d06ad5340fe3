"""Run every benchmark and write ``benchmarks/results/summary.json`` (``make bench``).

Each benchmark prints its table and writes its own JSON next to the summary. The summary holds
the issue's keys, each target with the measured value and whether it is met, and the machine.

    python -m benchmarks.run_all [--quick]
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks import (
    bench_batching,
    bench_breakdown,
    bench_client,
    bench_codec,
    bench_dataplane,
    bench_e2e,
    bench_scaling,
)
from benchmarks.common import bench_parser, machine, table, write_result


def main() -> None:
    ap = bench_parser(__doc__, quick_help="fewer sizes, steps and rounds")
    quick = ap.parse_args().quick
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    results: dict[str, Any] = {}
    for name, mod in [
        ("dataplane", bench_dataplane),
        ("codec", bench_codec),
        ("batching", bench_batching),
        ("client", bench_client),
        ("e2e", bench_e2e),
        ("breakdown", bench_breakdown),
        ("scaling", bench_scaling),
    ]:
        t = time.perf_counter()
        results[name] = mod.run(quick=quick)
        secs[name] = time.perf_counter() - t
    dp, bt, cl, e2e = results["dataplane"], results["batching"], results["client"], results["e2e"]
    sc = results["scaling"]
    targets = [
        ("dataplane_rtt_ratio_1mb", dp["rtt_ratio_1mb"], "<= 1.5", dp["rtt_ratio_1mb"] <= 1.5),
        ("dataplane_rtt_ratio_max_ge_1mb", dp["rtt_ratio_max_ge_1mb"], "<= 1.5", dp["rtt_ratio_max_ge_1mb"] <= 1.5),
        (
            "wire_overhead_fraction",
            dp["wire_overhead_fraction_max_ge_1mb"],
            "< 0.01",
            dp["wire_overhead_fraction_max_ge_1mb"] < 0.01,
        ),
        (
            "batching_speedup_8_clients",
            bt["batching_speedup_8_clients"],
            ">= 2",
            bt["batching_speedup_8_clients"] >= 2,
        ),
        (
            "fsl_vs_central_throughput",
            e2e["fsl_vs_central_throughput"],
            ">= 0.7",
            e2e["fsl_vs_central_throughput"] is not None and e2e["fsl_vs_central_throughput"] >= 0.7,
        ),
        ("client_peak_rss_mb", cl["client_peak_rss_mb"], "< 400", cl["client_peak_rss_mb"] < 400),
        (
            "server_overhead_ms_per_request",
            sc["server_overhead_ms_per_request"],
            "<= 0.5",
            sc["server_overhead_ms_per_request"] <= 0.5,
        ),
    ]
    rows = [{"key": k, "value": v, "target": t, "met": m} for k, v, t, m in targets]
    print(table(rows, title="Targets, ratios measured in this run"))
    summary = {
        **{k: v for k, v, _, _ in targets},
        "grpc_floor_ratio_1mb": dp["grpc_floor_ratio_1mb"],
        "dataplane_over_grpc_floor_1mb": dp["over_grpc_floor_1mb"],
        "batching_speedup_8_clients_fc1": bt["batching_speedup_8_clients_fc1"],
        "sflv1_vmap_speedup_conv1": bt["sflv1_vmap_speedup_conv1"],
        "fsl_vs_central_throughput_after_round1": e2e["fsl_vs_central_throughput_after_round1"],
        "client_peak_rss_with_flwr_mb": cl["client_peak_rss_with_flwr_mb"],
        "targets": rows,
        **{k: v for k, v in machine().items() if k in ("cpu", "threads", "device")},
        "machine": machine(),
        "quick": quick,
        "seconds": {**secs, "total": time.perf_counter() - t0},
    }
    path = write_result("summary", summary)
    print(f"wrote {path} in {summary['seconds']['total']:.0f} s")


if __name__ == "__main__":
    main()
