"""Codec throughput: encode + decode of one tensor per wire dtype, against a plain memory copy.

Encode is one copy (tensor memory -> bytes) plus protobuf's own into the message; decode is the one
copy protobuf's getter makes of the payload, then a view (``np.frombuffer``, no further copy).
float16 from float32 also scales (numpy: one pass for the max, one to scale, one to cast) and
decodes back to float32 (one more pass).

The data plane's training path frames its tensors instead (:mod:`fsl.wire.frame`): encode is the
one copy from the tensor's memory into the buffer gRPC sends (``frame_bytes``), decode parses the
small head and views the payload in the received bytes (``parse`` + ``tensor``: no copy, checked).

    python -m benchmarks.bench_codec [--quick]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks.common import bench_parser, machine, median, table, timeit, write_result
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed

MB = 1024 * 1024


def run(quick: bool = False) -> dict[str, Any]:
    codec.tune_allocator()  # as the data plane does
    torch.manual_seed(0)
    sizes = [1 * MB, 16 * MB] if not quick else [1 * MB, 4 * MB]
    rows = []
    for size in sizes:
        src = torch.randn(size // 4)  # float32 source activations
        for name, src_dtype, wire in [
            ("float32", torch.float32, None),
            ("float16 (from f32, scaled)", torch.float32, torch.float16),
            ("float16", torch.float16, None),
            ("bfloat16", torch.bfloat16, None),
            ("int8", torch.int8, None),
        ]:
            x = (src * 20).to(src_dtype) if src_dtype == torch.int8 else src.to(src_dtype)
            msg = codec.encode(x, wire)
            t_enc = median(timeit(lambda x=x, wire=wire: codec.encode_into(pb.Tensor(), x, wire), repeat=7, number=3))
            t_dec = median(timeit(lambda msg=msg: codec.decode(msg), repeat=7, number=3))
            arr = x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
            t_cpy = median(timeit(lambda arr=arr: arr.copy(), repeat=7, number=3))  # numpy: no thread pool
            back = codec.decode(msg)
            assert back.shape == x.shape

            def frame_encode(x: torch.Tensor = x, wire: Any = wire) -> bytes:
                framed = Framed(pb.TrainReply())
                framed.set("grad", x, wire)  # conversions (the scaled float16) included
                return frame.frame_bytes(framed)

            data = frame_encode()
            t_fenc = median(timeit(frame_encode, repeat=7, number=3))
            t_fdec = median(timeit(lambda d=data: frame.parse(pb.TrainReply, d).tensor("grad"), repeat=7, number=3))
            view = frame.parse(pb.TrainReply, data).tensor("grad")
            start = np.frombuffer(data, dtype=np.uint8).ctypes.data
            zero_copy = start <= view.data_ptr() < start + len(data)  # the tensor views the received bytes
            nbytes = x.numel() * x.element_size()
            rows.append(
                {
                    "size_mb": size // MB,
                    "dtype": name,
                    "wire_bytes": len(msg.data),
                    "encode_GBps": nbytes / t_enc / 1e9,
                    "decode_GBps": len(msg.data) / t_dec / 1e9,
                    "encode+decode_GBps": nbytes / (t_enc + t_dec) / 1e9,
                    "memcpy_GBps": nbytes / t_cpy / 1e9,
                    "decode_us": t_dec * 1e6,
                    "frame_encode_GBps": nbytes / t_fenc / 1e9,
                    "frame_decode_us": t_fdec * 1e6,
                    "frame_decode_zero_copy": zero_copy,
                }
            )
    print(table(rows, title="Codec: encode into a wire Tensor, decode as a view (GB/s of source tensor bytes)"))
    result = {"machine": machine(), "rows": rows}
    write_result("codec", result)
    return result


if __name__ == "__main__":
    run(**vars(bench_parser(__doc__).parse_args()))
