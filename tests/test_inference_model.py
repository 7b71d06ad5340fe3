"""Split-inference modeling: measured profiles, the cut scheduler, the simulator, provisioning."""

import json
import math
from dataclasses import replace

import pytest
import torch

from experiments.inference.profiles import DEVICES, NETWORKS, DeviceProfile, ModelProfile, NetworkProfile, profile_model
from experiments.inference.provisioning import (
    OnDemandWorkers,
    Stage,
    compare,
    load_from_trace,
    provision,
    reach_fractions,
    stages_from_exit_fractions,
)
from experiments.inference.scheduler import Scheduler
from experiments.inference.simulate import (
    SchedulerPolicy,
    SimDevice,
    SimServerConfig,
    all_cloud,
    bursty_trace,
    simulate,
    validate,
)
from fsl.deadlines import deadline_wait_ms
from fsl.models import build_model


@pytest.fixture(scope="module")
def cnn_profile() -> ModelProfile:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return profile_model(build_model("cnn", seed=0), (1, 28, 28), batch_sizes=(1, 8, 32), repeats=7)
    finally:
        torch.set_num_threads(threads)


def synthetic_profile() -> ModelProfile:
    """Four blocks with known costs: three light ones, then a heavy head (ms on the host)."""
    return ModelProfile(
        blocks=["a", "b", "c", "d"],
        input_shape=(1, 10, 10),
        batch_sizes=[1, 8, 32],
        block_ms={
            "a": [10.0, 30.0, 90.0],
            "b": [10.0, 30.0, 90.0],
            "c": [10.0, 30.0, 90.0],
            "d": [200.0, 500.0, 1400.0],
        },
        total_ms=[230.0, 590.0, 1670.0],
        block_flops={"a": 1e6, "b": 1e6, "c": 1e6, "d": 2e7},
        input_bytes=100_000,
        out_bytes={"a": 200_000, "b": 50_000, "c": 1_000, "d": 40},
        param_bytes={"a": 1_000, "b": 1_000, "c": 1_000, "d": 100 * 2**20},
        act_bytes={"a": 300_000, "b": 250_000, "c": 51_000, "d": 1_040},
    )


SERVER = DeviceProfile("srv", "cloud", 10.0, 1e6)
FAST = NetworkProfile("fast", 940.0, 0.5)
SLOW = NetworkProfile("slow", 1.0, 100.0)
BIG = DeviceProfile("big", "device", 1.0, 1024)  # memory for every block


# ---------------------------------------------------------------------- profiles


def test_profile_measures_cnn_bytes_flops_and_latency(cnn_profile):
    p = cnn_profile
    assert p.blocks == ["conv1", "conv2", "fc1", "fc2"]
    assert p.cut_bytes("conv1") == 16 * 14 * 14 * 4
    assert p.cut_bytes("conv2") == 32 * 7 * 7 * 4
    assert p.cut_bytes("input") == 28 * 28 * 4
    assert p.cut_bytes("fc2") == 10 * 4
    # FLOPs are 2 x multiply-accumulates of the convolutions and matrix products
    assert p.block_flops["conv2"] == 2 * 32 * 16 * 9 * 14 * 14
    assert p.segment_flops("fc1", "fc2") == 2 * (32 * 7 * 7 * 128 + 128 * 10)
    assert p.param_bytes["fc1"] == (32 * 7 * 7 * 128 + 128) * 4
    # latency grows with the batch (measured, so only roughly monotone)
    whole = [p.segment_ms(None, None, b) for b in (1, 8, 32)]
    assert whole[2] > whole[0] and whole[1] > 0.8 * whole[0]
    assert all(t > 0 for ts in p.block_ms.values() for t in ts)
    # interpolation stays between measured sizes, extrapolation does not shrink, speed divides
    assert min(whole[0], whole[1]) <= p.segment_ms(None, None, 4) <= max(whole[0], whole[1])
    assert p.segment_ms(None, None, 64) >= whole[2]
    assert p.segment_ms("conv1", "conv2", 8, speed=4.0) == pytest.approx(
        (p.block_ms["conv1"][1] + p.block_ms["conv2"][1]) / 4
    )
    assert p.client_ms("input") == 0.0 and p.server_ms("fc2") == 0.0
    assert p.memory_bytes(["conv1"]) > p.param_bytes["conv1"]
    assert ModelProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_measured_device_speed_and_network_transfer(cnn_profile):
    slow_board = cnn_profile.scaled(4.0)  # the same model, 4x slower everywhere
    dev = DeviceProfile.measured("board", slow_board, cnn_profile)
    assert dev.speed == pytest.approx(0.25) and not dev.declared and "measured" in dev.note
    assert all(d.declared and "declared" in d.note for d in DEVICES.values())
    assert DEVICES["pi5"].speed > DEVICES["pi4"].speed
    net = NetworkProfile("n", 8.0, 50.0)
    assert net.transfer_ms(1_000_000) == pytest.approx(25 + 1000)  # RTT/2 + 8 Mbit at 8 Mbit/s
    assert replace(net, loss=0.5).transfer_ms(1_000_000) == pytest.approx(2 * 1025)
    assert (
        NETWORKS["3g"].transfer_ms(10_000)
        > NETWORKS["4g"].transfer_ms(10_000)
        > NETWORKS["ethernet"].transfer_ms(10_000)
    )


# ---------------------------------------------------------------------- scheduler


def test_scheduler_goes_all_cloud_for_a_very_slow_device_on_a_fast_network(cnn_profile):
    crawl = DeviceProfile("crawl", "device", 1e-4, 1024)
    plan = Scheduler(cnn_profile, DEVICES["gpu-server"]).plan(crawl, NETWORKS["ethernet"], target_ms=50)
    assert plan.cut == "input" and plan.feasible and plan.device_ms == 0.0
    assert plan.bytes_up == 28 * 28 * 4


def test_scheduler_keeps_work_on_the_device_when_the_network_is_slow():
    p = synthetic_profile()
    s = Scheduler(p, SERVER)
    plan = s.plan(BIG, SLOW, target_ms=200)
    # sending the input or a wide activation over 1 Mbit/s takes far beyond 200 ms; the cut after
    # block c sends 1 kB; all on the device (230 ms) misses the target
    assert plan.cut == "c" and plan.feasible and plan.predicted_ms <= 200
    remote = [q for q in s.plans(BIG, SLOW, 200) if q.bytes_up > 0]
    assert plan.bytes_up == min(q.bytes_up for q in remote)
    crawl = DeviceProfile("crawl", "device", 0.01, 1024)
    assert s.plan(crawl, FAST, 200).cut == "input"


def test_scheduler_meets_the_target_at_least_server_cost_and_respects_memory():
    p = synthetic_profile()
    s = Scheduler(p, SERVER)
    plans = s.plans(BIG, FAST, target_ms=60)
    plan = s.plan(BIG, FAST, target_ms=60)
    feasible = [q for q in plans if q.feasible]
    assert plan.feasible and plan.predicted_ms <= 60
    assert plan.server_ms == min(q.server_ms for q in feasible)
    # the prediction is the sum of its parts
    assert plan.predicted_ms == pytest.approx(plan.device_ms + plan.network_ms + plan.wait_ms + plan.server_ms)
    assert plan.device_ms == pytest.approx(30.0) and plan.server_ms == pytest.approx(20.0)
    # with a loose target everything fits in time, so all-local (no server) wins ...
    assert s.plan(BIG, FAST, target_ms=1000).cut == "d"
    # ... unless the head's 100 MiB of weights do not fit the device
    small = DeviceProfile("small", "device", 1.0, 50)
    assert s.plan(small, FAST, target_ms=1000).cut == "c"


def test_scheduler_headroom_keeps_plans_off_the_edge_of_the_target():
    p = synthetic_profile()
    edge = Scheduler(p, SERVER).plan(BIG, FAST, target_ms=54)
    assert edge.cut == "c" and edge.predicted_ms > 0.9 * 54  # 50.5 ms of 54: any jitter misses
    safe = Scheduler(p, SERVER, headroom=0.2).plan(BIG, FAST, target_ms=54)
    assert safe.feasible and safe.predicted_ms <= 0.8 * 54 and safe.cut == "b"  # 41.9 ms
    assert safe.server_ms > edge.server_ms  # the margin costs server compute
    with pytest.raises(ValueError, match="headroom"):
        Scheduler(p, SERVER, headroom=1.0)


def test_scheduler_marks_an_unreachable_target_infeasible():
    s = Scheduler(synthetic_profile(), SERVER)
    plan = s.plan(BIG, SLOW, target_ms=5)
    assert not plan.feasible
    assert plan.predicted_ms == min(q.predicted_ms for q in s.plans(BIG, SLOW, 5))


def test_scheduler_replans_when_a_device_gets_slower_or_its_network_changes():
    s = Scheduler(synthetic_profile(), SERVER, alpha=0.5)
    before = s.plan(BIG, FAST, target_ms=60)
    assert before.cut == "c"
    for _ in range(8):  # the device now computes 10x slower than declared
        device_ms = 10 * before.device_ms
        s.observe("big", "c", before.predicted_ms - before.device_ms + device_ms, device_ms=device_ms)
    assert s.learned("big")["speed"] < 0.2
    after = s.plan(BIG, FAST, target_ms=60)
    assert after.cut == "input" and after.feasible
    # the same with no breakdown: the unexplained time is put on the device's compute
    s2 = Scheduler(synthetic_profile(), SERVER, alpha=0.5)
    p0 = s2.plan(BIG, FAST, 60)
    for _ in range(8):
        s2.observe("big", p0.cut, p0.predicted_ms + 9 * p0.device_ms)
    assert s2.plan(BIG, FAST, 60).cut == "input"
    # a link that drops to 0.1 Mbit/s makes the fast plan miss
    s3 = Scheduler(synthetic_profile(), SERVER)
    assert s3.plan(BIG, FAST, 60).feasible
    s3.observe_network("fast", bandwidth_mbps=0.1)
    late = s3.plan(BIG, FAST, 60)
    assert not late.feasible and late.network_ms > 50


def test_early_exits_lower_the_expected_server_cost():
    p = synthetic_profile()
    plain = Scheduler(p, SERVER).plan(BIG, FAST, 60)
    exiting = Scheduler(p, SERVER, exit_probability={"b": 0.8}).plan(BIG, FAST, 60)
    assert plain.cut == "c"
    assert exiting.cut == "b"  # 80% stop on the device after b, so b costs the server least
    assert exiting.server_ms == pytest.approx(0.2 * p.server_ms("b", speed=SERVER.speed))
    assert exiting.predicted_ms < exiting.tail_ms


def test_deadline_wait_is_the_slack_of_the_tightest_deadline():
    assert deadline_wait_ms([100.0, 50.0], now=10.0, service_ms=5.0) == pytest.approx(35.0)
    assert deadline_wait_ms([100.0, 50.0], now=10.0, service_ms=5.0, max_wait_ms=20.0) == 20.0
    assert deadline_wait_ms([12.0], now=10.0, service_ms=5.0) == 0.0
    assert deadline_wait_ms([], now=10.0, service_ms=5.0) == 0.0


# ---------------------------------------------------------------------- simulation


def _cloud_fleet(rate_hz: float, n: int = 5) -> list[SimDevice]:
    return [SimDevice(f"pi4-{i}", DEVICES["pi4"], NETWORKS["ethernet"], 50.0, rate_hz=rate_hz) for i in range(n)]


def test_attainment_drops_when_load_exceeds_capacity():
    p = synthetic_profile()
    server = SimServerConfig(SERVER, workers=1, max_batch=1)
    service = p.server_ms("input", 1, SERVER.speed)  # 23 ms per request
    capacity_hz = 1000 / service
    low = simulate(p, _cloud_fleet(0.3 * capacity_hz / 5), all_cloud(), server, 5000, seed=1).summary()
    high = simulate(p, _cloud_fleet(2.0 * capacity_hz / 5), all_cloud(), server, 5000, seed=1).summary()
    assert low["attainment"] > 0.9
    assert high["attainment"] < 0.3
    assert high["per_kind"]["pi4"]["p95_ms"] > 5 * low["per_kind"]["pi4"]["p95_ms"]
    assert high["server_ms_total"] == pytest.approx(service * high["requests"])


def test_batching_raises_the_batch_size_and_the_capacity_under_load():
    p = synthetic_profile()
    capacity_hz = 1000 / p.server_ms("input", 1, SERVER.speed)
    batched = SimServerConfig(SERVER, workers=1, max_batch=16, max_wait_ms=20)
    low = simulate(p, _cloud_fleet(0.1 * capacity_hz / 5), all_cloud(), batched, 5000, seed=2).summary()
    high = simulate(p, _cloud_fleet(2.0 * capacity_hz / 5), all_cloud(), batched, 5000, seed=2).summary()
    unbatched = SimServerConfig(SERVER, workers=1, max_batch=1)
    high1 = simulate(p, _cloud_fleet(2.0 * capacity_hz / 5), all_cloud(), unbatched, 5000, seed=2).summary()
    assert low["mean_batch"] < 2.0
    assert high["mean_batch"] > 2 * low["mean_batch"]
    assert high["attainment"] > high1["attainment"] + 0.3
    assert high["server_ms_total"] < high1["server_ms_total"]


def test_the_batcher_waits_only_as_long_as_the_deadlines_allow():
    p = synthetic_profile()
    rate_hz = 0.5 * 1000 / p.server_ms("input", 1, SERVER.speed) / 5
    server = SimServerConfig(SERVER, workers=4, max_batch=16, max_wait_ms=50)

    def run(target_ms: float) -> dict:
        fleet = [
            SimDevice(f"pi4-{i}", DEVICES["pi4"], NETWORKS["ethernet"], target_ms, rate_hz=rate_hz) for i in range(5)
        ]
        return simulate(p, fleet, all_cloud(), server, 10000, seed=8).summary()

    tight, loose = run(30.0), run(200.0)  # one request alone needs ~24.4 ms end to end
    assert tight["attainment"] == 1.0 and loose["attainment"] == 1.0
    assert tight["mean_batch"] < 1.1
    assert loose["mean_batch"] > 1.5


def test_simulation_is_deterministic_given_its_seed():
    p = synthetic_profile()
    server = SimServerConfig(SERVER, workers=2, max_batch=8)
    args = (p, _cloud_fleet(10.0), all_cloud(), server, 3000)
    a = simulate(*args, seed=5, jitter=0.2)
    b = simulate(*args, seed=5, jitter=0.2)
    c = simulate(*args, seed=6, jitter=0.2)
    assert [r.to_dict() for r in a.records] == [r.to_dict() for r in b.records]
    assert a.batch_sizes == b.batch_sizes
    assert [r.arrival_ms for r in a.records] != [r.arrival_ms for r in c.records]


def test_scheduler_uses_less_server_compute_than_all_cloud_for_a_mixed_fleet(cnn_profile):
    heavy = cnn_profile.scaled(100.0)  # a model 100x the CNN, so weak devices cannot run it in time
    fleet = []
    for i in range(4):
        fleet += [
            SimDevice(f"pi4-{i}", DEVICES["pi4"], NETWORKS["4g"], 150.0, rate_hz=3),
            SimDevice(f"laptop-{i}", DEVICES["laptop"], NETWORKS["wifi"], 150.0, rate_hz=3),
            SimDevice(f"phone-{i}", DEVICES["phone"], NETWORKS["5g"], 150.0, rate_hz=3),
        ]
    server = SimServerConfig(DEVICES["gpu-server"], workers=1, max_batch=8, max_wait_ms=5)
    cloud = simulate(heavy, fleet, all_cloud(), server, 5000, seed=3).summary()
    sched = simulate(heavy, fleet, SchedulerPolicy(Scheduler(heavy, DEVICES["gpu-server"])), server, 5000, seed=3)
    summary = sched.summary()
    assert summary["requests"] == cloud["requests"] > 100
    assert summary["attainment"] >= cloud["attainment"] - 0.05
    assert summary["server_ms_total"] < 0.5 * cloud["server_ms_total"]
    # the laptops, fast enough to run the whole model in time, stay local
    assert summary["per_kind"]["laptop"]["cuts"].get("fc2", 0) > 0.8 * summary["per_kind"]["laptop"]["requests"]


def test_simulated_scheduler_replans_a_device_that_slows_down():
    p = synthetic_profile()
    fleet = [SimDevice(f"d{i}", BIG, FAST, 250.0, rate_hz=1.0, slowdown=3.0, slowdown_from_ms=2000.0) for i in range(3)]
    server = SimServerConfig(SERVER, workers=1, max_batch=4)
    learning = simulate(p, fleet, SchedulerPolicy(Scheduler(p, SERVER)), server, 20000, seed=4)
    frozen = simulate(p, fleet, SchedulerPolicy(Scheduler(p, SERVER), learn=False), server, 20000, seed=4)
    early = [r.cut for r in learning.records if r.arrival_ms < 2000]
    # all local while the devices are as declared (but for a request that finds its device busy)
    assert early.count("d") > 0.6 * len(early)
    assert learning.summary()["attainment"] > frozen.summary()["attainment"] + 0.3
    late = [r.cut for r in learning.records if r.arrival_ms > 6000]
    assert late.count("d") < 0.2 * len(late)


def test_bursty_trace_and_validation():
    trace = bursty_trace(600_000, base_rate_hz=5, burst_rate_hz=100, mean_burst_ms=5000, mean_calm_ms=20000, seed=7)
    assert trace == bursty_trace(600_000, 5, 100, 5000, 20000, seed=7)
    assert trace == sorted(trace) and 0 <= trace[0] and trace[-1] < 600_000
    counts = load_from_trace(trace, 1.0, 600_000)
    mean = sum(counts) / len(counts)
    var = sum((c - mean) ** 2 for c in counts) / len(counts)
    assert 5 < mean < 100
    assert var > 3 * mean  # far burstier than Poisson (variance = mean)
    v = validate([100.0, 110.0, 150.0, 95.0], [100.0, 100.0, 100.0, 100.0])
    assert v["median_rel_error"] == pytest.approx(0.075)
    assert v["within_20pct"] == pytest.approx(0.75)
    assert v["p90_rel_error"] == pytest.approx(0.1 + 0.7 * (0.5 - 0.1))  # errors 0, .05, .1, .5


# ---------------------------------------------------------------------- provisioning


def _trace_load() -> list[float]:
    trace = bursty_trace(
        3_600_000, base_rate_hz=20, burst_rate_hz=200, mean_burst_ms=60_000, mean_calm_ms=300_000, seed=0
    )
    return load_from_trace(trace, 60.0, 3_600_000)


def test_exit_aware_provisioning_costs_less_than_full_provisioning():
    load = _trace_load()
    stages = [Stage("s1", 10.0, 0.5), Stage("s2", 20.0, 0.4), Stage("s3", 40.0, 0.0)]
    result = compare(stages, load, 60.0)
    assert result["reach"] == pytest.approx([1.0, 0.5, 0.3])
    for policy in ("mixed p50", "mixed p90", "always-on only"):
        entry = result["policies"][policy]
        assert entry["exit_aware"]["cost"] < entry["full"]["cost"]
        assert entry["reduction"] > 0.05
        assert entry["exit_aware"]["fixed_servers"] < entry["full"]["fixed_servers"]
    # paying per use, exits save nothing more: no always-on capacity is sized
    assert result["policies"]["on-demand only"]["reduction"] == pytest.approx(0.0)
    json.dumps(result)


def test_without_exits_both_provisionings_cost_the_same():
    load = _trace_load()
    stages = [Stage("s1", 10.0, 0.0), Stage("s2", 20.0, 0.0), Stage("s3", 40.0, 0.0)]
    for policy, entry in compare(stages, load, 60.0)["policies"].items():
        assert entry["exit_aware"]["cost"] == pytest.approx(entry["full"]["cost"]), policy
        assert entry["reduction"] == pytest.approx(0.0)


def test_provisioning_policies_bracket_the_cost_optimal_mix():
    load = _trace_load()
    stages = stages_from_exit_fractions(["s1", "s2", "s3"], [10.0, 20.0, 40.0], [0.5, 0.2, 0.3])
    assert reach_fractions(stages) == pytest.approx([1.0, 0.5, 0.3])
    always = provision(stages, load, 60.0, percentile=100)
    never = provision(stages, load, 60.0, percentile=0)
    best = provision(stages, load, 60.0, percentile=None)
    assert always.on_demand_cost == 0.0 and always.cold_starts == 0
    assert never.fixed_cost == 0.0 and never.cold_starts > 0
    # on-demand only pays for exactly the work, requests x service time, plus the cold starts
    reach = reach_fractions(stages)
    work_s = sum(r * f * 60.0 * s.service_ms / 1e3 for s, f in zip(stages, reach, strict=True) for r in load)
    price = OnDemandWorkers().cost_per_second
    assert never.on_demand_cost == pytest.approx((work_s + never.cold_starts * 0.5) * price)
    for q in (0, 25, 50, 75, 90, 100):
        assert best.cost <= provision(stages, load, 60.0, percentile=q).cost + 1e-9
    assert math.isfinite(best.cost) and best.cost > 0
