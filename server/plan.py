"""What a round does in each split-learning architecture, as plain data.

:func:`round_plan` turns a mode and the round's clients into a :class:`RoundPlan`:
who trains in which order, which server-segment replica each client uses, and
what is aggregated afterwards. The ServerApp executes plans; the reductions the
literature states (``hybrid`` with one group is ``fsl``; with one client per
group it is SplitFed v1) hold by construction and are tested on plans.

=========  ==========  ======================  =================  =================
mode       clients     server segment          client segments    after the round
=========  ==========  ======================  =================  =================
``sl``     in turn     one, shared             handed on          last one is kept
``sflv1``  parallel    one copy per client     FedAvg             copies FedAvg'd
``sflv2``  in turn     one, shared             FedAvg
``fsl``    parallel    one, shared             FedAvg
``psl``    parallel    one, shared             each keeps its own
``hybrid`` parallel    one copy per group      FedAvg             copies FedAvg'd
``fl``     parallel    (none: full model)      FedAvg
=========  ==========  ======================  =================  =================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["NodeInfo", "RoundPlan", "group_clients", "round_plan"]


@dataclass(frozen=True)
class NodeInfo:
    """What a client declared when the run started."""

    node_id: int
    examples: int = 0  # training samples it holds
    capability: float = 1.0  # declared relative compute capability (node config `capability`)
    partition: int | None = None  # the data partition it holds (node config `partition-id`), if it said


@dataclass(frozen=True)
class RoundPlan:
    order: tuple[int, ...]  # the round's clients, in the order they train when sequential
    sequential: bool  # one client after another (sl, sflv2) or all at once
    groups: tuple[tuple[int, ...], ...]  # clients sharing one server-segment replica
    aggregate_clients: bool  # FedAvg the client segments after the round
    handoff: bool  # sl: each client starts from the segment the previous one trained
    own_segments: bool  # psl: every client trains and keeps its own segment

    @property
    def replicas(self) -> dict[int, str]:
        """Client -> replica id (one id for everyone means the global segment itself)."""
        return {node: f"g{i}" for i, group in enumerate(self.groups) for node in group}


def group_clients(nodes: Sequence[NodeInfo], groups: int, rule: str) -> tuple[tuple[int, ...], ...]:
    """Split ``nodes`` into ``groups`` groups (0 or more than there are nodes: one per node).

    ``count``: equal numbers, in node order; ``data``: greedy balance of the samples held
    (largest first onto the lightest group); ``capability``: sorted by declared capability
    and cut into contiguous runs, so devices of a kind share a replica.
    """
    k = len(nodes) if groups == 0 or groups >= len(nodes) else groups
    if k <= 0:
        return ()
    if rule == "count":
        out: list[list[int]] = [[] for _ in range(k)]
        for i, n in enumerate(nodes):
            out[i % k].append(n.node_id)
    elif rule == "data":
        out = [[] for _ in range(k)]
        load = [0] * k
        for n in sorted(nodes, key=lambda n: (-n.examples, n.node_id)):
            j = min(range(k), key=lambda j: (load[j], j))
            out[j].append(n.node_id)
            load[j] += n.examples
    elif rule == "capability":
        ranked = sorted(nodes, key=lambda n: (n.capability, n.node_id))
        size, extra = divmod(len(ranked), k)
        out, start = [], 0
        for j in range(k):
            end = start + size + (1 if j < extra else 0)
            out.append([n.node_id for n in ranked[start:end]])
            start = end
    else:
        raise ValueError(f"unknown grouping rule {rule!r}")
    return tuple(tuple(sorted(g)) for g in out if g)


def round_plan(
    mode: str,
    selected: Sequence[int],
    *,
    info: Mapping[int, NodeInfo] | None = None,
    groups: int = 2,
    group_by: str = "count",
) -> RoundPlan:
    """The plan of one round of ``mode`` over the ``selected`` clients (in selection order)."""
    order = tuple(selected)
    every = (tuple(sorted(order)),) if order else ()
    alone = tuple((n,) for n in sorted(order))
    if mode in ("fsl", "ushaped"):
        return RoundPlan(order, False, every, True, False, False)
    if mode == "sflv1":
        return RoundPlan(order, False, alone, True, False, False)
    if mode == "sflv2":
        return RoundPlan(order, True, every, True, False, False)
    if mode == "sl":
        return RoundPlan(order, True, every, False, True, False)
    if mode == "psl":
        return RoundPlan(order, False, every, False, False, True)
    if mode == "hybrid":
        nodes = [(info or {}).get(n, NodeInfo(n)) for n in order]
        return RoundPlan(order, False, group_clients(nodes, groups, group_by), True, False, False)
    if mode == "fl":
        return RoundPlan(order, False, (), True, False, False)
    raise ValueError(f"mode {mode!r} has no round plan")
