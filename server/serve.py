"""Serving a trained split model: ``fsl serve`` and ``fsl serve-token``.

``fsl serve RUN_DIR`` loads the server segment of a run's newest checkpoint and serves split
inference on the same data plane as training (raw tensor buffers, TLS, per-client
credentials), batching concurrent requests under their latency budgets
(:class:`server.infer_batching.InferBatcher`). Training RPCs are refused: rounds belong to
the ServerApp.

Credentials: the server keeps a secret in ``RUN_DIR/serve.secret`` (created on first use,
mode 0600); ``fsl serve-token RUN_DIR CLIENT`` prints the token that client presents. Tokens
are bound to the run, the client and a *serving epoch* (``--epoch``): restarting the server
with a new epoch revokes every token handed out before (PERMISSION_DENIED).

Its client, ``fsl predict``, lives with the command line (:mod:`fsl_cli.predict`): the server
role does not import the client role.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ServedModel", "load_served_model", "register", "serving_authority"]


@dataclass
class ServedModel:
    cfg: Any  # ExperimentConfig
    client: Any  # nn.Module, the client segment (bottom, for U-shaped)
    server: Any  # nn.Module, the server segment
    signature: Any  # fsl.cutvalues.Signature of a traced cut, None for one tensor
    input_shape: tuple[int, ...]
    num_classes: int
    round: int
    run_id: str


def load_served_model(run_dir: str | Path, dataset: Any | None = None, merge: bool = True) -> ServedModel:
    """Both segments of ``run_dir``'s newest checkpoint, built from the run's own config.

    A LoRA run's checkpoint holds the adapters (and what else trained); the frozen base is built
    here from the same pretrained weights, checked against the checkpoint's fingerprint, and with
    ``merge`` the adapters are folded into it (:func:`fsl.lora.merge_lora`): the served segments are
    then the plain model's, with no adapter left to compute."""
    from fsl.config import load_experiment
    from fsl.experiment import build_model_for, experiment_dataset, split_for
    from fsl.rundir import RunDir

    run = RunDir(run_dir)
    if not run.config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = load_experiment(str(run.config_path))
    if cfg.mode in ("fl", "central") or cfg.model.ushaped:
        raise ValueError(f"fsl serve serves split models; this run is {cfg.mode!r} (ushaped={cfg.model.ushaped})")
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to serve")
    ds = dataset if dataset is not None else experiment_dataset(cfg)
    model = build_model_for(cfg, ds.input_shape, ds.num_classes)
    server_sd = {k[len("segment.") :]: v for k, v in ckpt.server.items() if k.startswith("segment.")}
    if cfg.model.lora.enabled:
        split = _lora_split(cfg, model, ckpt, server_sd, ds.input_shape, str(run_dir), merge)
    else:
        split = split_for(cfg, model, ds.input_shape)
        split.client.load_state_dict(ckpt.client)
        split.server.load_state_dict(server_sd)
    return ServedModel(
        cfg=cfg,
        client=split.client.eval(),
        server=split.server.eval(),
        signature=split.graph.signature(1) if split.graph is not None else None,
        input_shape=tuple(ds.input_shape),
        num_classes=ds.num_classes,
        round=ckpt.round,
        run_id=f"serve:{Path(run_dir).resolve().name}",
    )


def _lora_split(
    cfg: Any, model: Any, ckpt: Any, server_sd: dict[str, Any], input_shape: tuple[int, ...], where: str, merge: bool
) -> Any:
    """A LoRA run's model with its checkpoint's adapters on the locally built base, split at its cut
    (merged first, when asked: then it is split as the plain model, with the plain model's names)."""
    from fsl.experiment import base_digests, server_side, split_for, without_lora
    from fsl.lora import check_base, load_carried, merge_lora

    client, side = server_side(cfg, model, input_shape)
    check_base(ckpt.extra.get("base_digest"), base_digests(client, side.segment), where)
    load_carried(model, {**ckpt.client, **server_sd}, "model")
    if not merge:
        return split_for(cfg, model, input_shape)
    return split_for(without_lora(cfg), merge_lora(model), input_shape)


def serving_authority(run_dir: str | Path, epoch: int = 0, create: bool = True) -> Any:
    """The :class:`fsl.auth.RoundAuthority` of ``run_dir``'s inference service (epoch ``epoch`` open)."""
    from fsl.auth import RoundAuthority

    path = Path(run_dir) / "serve.secret"
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"{path} does not exist: start `fsl serve {run_dir}` once first")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    secret = bytes.fromhex(path.read_text().strip())
    auth = RoundAuthority(f"serve:{Path(run_dir).resolve().name}", secret=secret)
    auth.open_round(epoch)
    return auth


def _cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from fsl.models import cut_shape
    from server.infer_batching import InferBatcher
    from server.split_server import SplitServer, SplitServerState

    torch.set_num_threads(args.threads) if args.threads else None
    m = load_served_model(args.run_dir)
    auth = serving_authority(args.run_dir, args.epoch)
    state = SplitServerState(
        m.server,
        sample_shape=cut_shape(m.client, m.input_shape) if m.signature is None else (),
        signature=m.signature,
        num_classes=m.num_classes,
        device=args.device,
        authority=auth,
        model_name=m.cfg.model.name,
        cut=m.cfg.model.cut,
        mode=m.cfg.mode,
        inference_only=True,
    )
    batcher = (
        None if args.no_batching else InferBatcher(state, max_samples=args.max_batch, max_wait_ms=args.max_wait_ms)
    )
    tls: dict[str, Any] = {}
    if args.tls_certfile or args.tls_keyfile:
        if not (args.tls_certfile and args.tls_keyfile):
            print("error: TLS needs both --tls-certfile and --tls-keyfile", file=sys.stderr)
            return 2
        tls = {"certificate_chain": Path(args.tls_certfile), "private_key": Path(args.tls_keyfile)}
    server = SplitServer(state, args.address, infer_batcher=batcher, **tls)
    server.start()
    info = {
        "address": server.address,
        "tls": server.tls,
        "device": str(state.torch_device),
        "round": m.round,
        "model": m.cfg.model.name,
        "cut": m.cfg.model.cut,
        "epoch": args.epoch,
        "batching": batcher is not None,
    }
    print(json.dumps(info), flush=True)  # one line that scripts (and tests) read
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1.0)
    if batcher is not None:
        batcher.close()
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    auth = serving_authority(args.run_dir, args.epoch, create=False)
    print(auth.issue(args.epoch, args.client))
    return 0


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    p = sub.add_parser("serve", help="serve split inference from a run's newest checkpoint (batching, TLS, tokens)")
    p.add_argument("run_dir")
    p.add_argument("--address", default="127.0.0.1:50061", help="host:port to listen on (port 0: any)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--epoch", type=int, default=0, help="serving epoch: tokens of other epochs are refused")
    p.add_argument("--max-batch", type=int, default=256, help="most samples in one server batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for requests without a budget")
    p.add_argument("--no-batching", action="store_true", help="serve every request on its own")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tls-certfile", default="", help="PEM certificate chain (with --tls-keyfile: TLS)")
    p.add_argument("--tls-keyfile", default="")
    q = sub.add_parser("serve-token", help="print the data-plane token of a client of `fsl serve RUN_DIR`")
    q.add_argument("run_dir")
    q.add_argument("client")
    q.add_argument("--epoch", type=int, default=0)
    return {"serve": _cmd_serve, "serve-token": _cmd_token}
