"""Round plans of every architecture, and the reductions the literature states."""

import pytest

from server.plan import NodeInfo, group_clients, round_plan

NODES = (11, 7, 3, 42, 5)


def _shape(plan):
    """What a plan does, independent of replica names."""
    return (
        plan.sequential,
        frozenset(map(frozenset, plan.groups)),
        plan.aggregate_clients,
        plan.handoff,
        plan.own_segments,
    )


def test_hybrid_with_one_group_is_fsl():
    assert _shape(round_plan("hybrid", NODES, groups=1)) == _shape(round_plan("fsl", NODES))


@pytest.mark.parametrize("groups", [0, len(NODES), 99])
def test_hybrid_with_one_client_per_group_is_sflv1(groups):
    assert _shape(round_plan("hybrid", NODES, groups=groups)) == _shape(round_plan("sflv1", NODES))


def test_mode_table():
    p = {m: round_plan(m, NODES) for m in ("sl", "sflv1", "sflv2", "fsl", "psl", "hybrid", "fl")}
    assert [m for m, x in p.items() if x.sequential] == ["sl", "sflv2"]
    assert [m for m, x in p.items() if x.handoff] == ["sl"]
    assert [m for m, x in p.items() if x.own_segments] == ["psl"]
    assert [m for m, x in p.items() if not x.aggregate_clients] == ["sl", "psl"]
    assert len(p["sflv1"].groups) == len(NODES) and len(p["fsl"].groups) == 1 and len(p["hybrid"].groups) == 2
    assert p["fl"].groups == ()
    assert p["sl"].order == NODES  # clients train in the order they were selected
    assert len(set(p["sflv1"].replicas.values())) == len(NODES)
    assert len(set(p["fsl"].replicas.values())) == 1


def test_grouping_rules():
    info = [
        NodeInfo(1, 1000, 4.0),
        NodeInfo(2, 100, 1.0),
        NodeInfo(3, 900, 0.5),
        NodeInfo(4, 50, 4.0),
        NodeInfo(5, 60, 1.0),
    ]
    by_count = group_clients(info, 2, "count")
    assert sorted(map(len, by_count)) == [2, 3]
    by_data = group_clients(info, 2, "data")
    loads = sorted(sum(next(i.examples for i in info if i.node_id == n) for n in g) for g in by_data)
    assert loads == [1050, 1060]  # greedy balance: within one small client of each other
    assert not any({1, 3} <= set(g) for g in by_data)  # the two big clients end up apart
    by_cap = group_clients(info, 2, "capability")
    assert {4, 1} <= set(next(g for g in by_cap if 1 in g))  # the two strong devices share a replica
    for grouping in (by_count, by_data, by_cap):
        assert sorted(n for g in grouping for n in g) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        group_clients(info, 2, "random")
