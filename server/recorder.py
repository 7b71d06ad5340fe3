"""The opt-in observation recorder: what an honest-but-curious split server sees, on disk.

Attach it to a :class:`server.split_server.SplitServerState` (it is the state's
``observer``) and it keeps, for the configured rounds and the first
``max_batches`` training batches of each client, exactly what arrived on the data
plane: the smashed activations and the labels (when the split sends them). At the
end of a round the ServerApp hands it the client segment it sent out (what a
white-box attacker knows), each client's returned segment (what it aggregates,
unless secure aggregation hides them) and its own server segment. Nothing here
ever sees an input image.

Layout under the run directory (safetensors and JSON only, never pickle)::

    observations/meta.json                       architecture, cut, input shape, classes, dataset, rounds
    observations/round-NNNN/data.safetensors     "<client>/<step>/activations", ".../labels", ".../gradients",
                                                 ".../server_outputs" (U-shaped), ".../cut_gradients"
                                                 (dL/dh sent back: ``SplitServerState.exchange_observer``)
    observations/round-NNNN/client_segment.safetensors   the segment sent to clients this round
    observations/round-NNNN/server_segment.safetensors   the server's own segment at the round's end
    observations/round-NNNN/updates/<client>.safetensors each client's returned segment
    observations/round-NNNN/index.json           [{"client", "step", "n"}...] in arrival order

Ground-truth inputs are written by the data owner to ``ground_truth/`` (see
:mod:`attacks.ground_truth`), never by this module.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["NullRecorder", "ObservationRecorder", "attach_recorder", "round_dir", "update_file"]


def round_dir(run_path: str | Path, rnd: int) -> Path:
    return Path(run_path) / "observations" / f"round-{rnd:04d}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def update_file(round_path: Path, client: str) -> Path:
    """Where :meth:`ObservationRecorder.end_round` writes the segment ``client`` returned."""
    return round_path / "updates" / f"{_safe(client)}.safetensors"


def _save(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


@dataclass
class ObservationRecorder:
    """Records rounds ``rounds`` (empty = all) and the first ``max_batches`` batches per client and round."""

    run_path: Path
    meta: dict[str, Any]
    rounds: tuple[int, ...] = ()
    max_batches: int = 4
    _data: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _index: dict[int, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    _counts: dict[tuple[int, str], int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    enabled = True

    def __post_init__(self) -> None:
        self.run_path = Path(self.run_path)
        if self.max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, got {self.max_batches}")
        out = self.run_path / "observations"
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").write_text(json.dumps({**self.meta, "max_batches": self.max_batches}, indent=2) + "\n")

    def wants(self, rnd: int) -> bool:
        return not self.rounds or rnd in self.rounds

    # the SplitServerState.observer signature
    def __call__(self, header: Any, activations: torch.Tensor, labels: torch.Tensor | None) -> None:
        self.record(int(header.round), str(header.client_id), int(header.step), activations, labels=labels)

    # the SplitServerState.exchange_observer signature: after the step, with the gradient sent back
    def exchange(
        self, header: Any, activations: torch.Tensor, labels: torch.Tensor, cut_gradients: torch.Tensor
    ) -> None:
        self.record(
            int(header.round), str(header.client_id), int(header.step), activations,
            labels=labels, cut_gradients=cut_gradients,
        )  # fmt: skip

    def record(
        self,
        rnd: int,
        client: str,
        step: int,
        activations: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        gradients: torch.Tensor | None = None,
        server_outputs: torch.Tensor | None = None,
        cut_gradients: torch.Tensor | None = None,
    ) -> bool:
        """Keep one batch if its round is recorded and the client has not used up its batches; True if kept.

        ``cut_gradients`` (B, ...) is the gradient dL/dh the server sent back for the batch.
        """
        if not self.wants(rnd):
            return False
        with self._lock:
            used = self._counts.get((rnd, client), 0)
            if used >= self.max_batches:
                return False
            self._counts[(rnd, client)] = used + 1
            store = self._data.setdefault(rnd, {})
            prefix = f"{client}/{step}"
            store[f"{prefix}/activations"] = activations.detach().cpu().float().clone()
            sent = (
                ("labels", labels),
                ("gradients", gradients),
                ("server_outputs", server_outputs),
                ("cut_gradients", cut_gradients),
            )
            for name, t in sent:
                if t is not None:
                    store[f"{prefix}/{name}"] = t.detach().cpu().clone()
            self._index.setdefault(rnd, []).append({"client": client, "step": step, "n": int(activations.shape[0])})
        return True

    def end_round(
        self,
        rnd: int,
        client_segment: Mapping[str, torch.Tensor] | None,
        server_segment: Mapping[str, torch.Tensor] | None = None,
        updates: Iterable[tuple[str, Mapping[str, torch.Tensor]]] = (),
    ) -> Path | None:
        """Write round ``rnd``: what was recorded plus the segments the server holds."""
        if not self.wants(rnd):
            return None
        with self._lock:
            data = self._data.pop(rnd, {})
            index = self._index.pop(rnd, [])
            # the round's per-client batch counts go with it: a long run records many rounds' clients
            self._counts = {k: n for k, n in self._counts.items() if k[0] != rnd}
        d = round_dir(self.run_path, rnd)
        d.mkdir(parents=True, exist_ok=True)
        if data:
            _save(data, d / "data.safetensors")
        if client_segment is not None:
            _save(dict(client_segment), d / "client_segment.safetensors")
        if server_segment is not None:
            _save(dict(server_segment), d / "server_segment.safetensors")
        for client, seg in updates:
            _save(dict(seg), update_file(d, client))
        (d / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        return d


class NullRecorder:
    """What :func:`attach_recorder` returns when recording is off: every call does nothing."""

    enabled = False

    def wants(self, rnd: int) -> bool:
        return False

    def end_round(self, *args: Any, **kwargs: Any) -> None:
        return None


def attach_recorder(cfg: Any, run: Any, state: Any, input_shape: tuple[int, ...]) -> ObservationRecorder | NullRecorder:
    """Build the recorder that ``cfg.record`` asks for and make it ``state``'s observer."""
    rec_cfg = getattr(cfg, "record", None)
    if rec_cfg is None or not rec_cfg.enabled:
        return NullRecorder()
    recorder = ObservationRecorder(
        Path(run.path),
        meta={
            "model": cfg.model.name,
            "cut": cfg.model.cut,
            "norm": cfg.model.norm,
            "dataset": cfg.data.name,
            "mode": cfg.mode,
            "num_classes": int(state.num_classes),
            "input_shape": list(input_shape),
            "sample_shape": list(state.sample_shape),
            "labels_sent": not getattr(cfg.model, "ushaped", False),
        },
        rounds=rec_cfg.round_list(cfg.train.rounds),
        max_batches=rec_cfg.max_batches,
    )
    if getattr(cfg.model, "ushaped", False):
        state.observer = recorder  # U-shaped: the activations of Forward (no labels, no cut gradient)
    else:
        state.exchange_observer = recorder.exchange  # activations, labels and the dL/dh sent back
    return recorder


def updates_from_replies(replies: Iterable[Any]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(client id, returned client segment) of every successful Flower reply (the ServerApp's round)."""
    out = []
    for m in replies:
        if m.has_error() or "arrays" not in m.content:
            continue
        out.append((str(m.metadata.src_node_id), m.content["arrays"].to_torch_state_dict()))
    return out


def recorder_config(recorder: ObservationRecorder | NullRecorder, run: Any) -> dict[str, str]:
    """Keys the ServerApp adds to every round's config so data owners in simulation write ground truth."""
    return {"record-dir": str(Path(run.path).resolve())} if recorder.enabled else {}
