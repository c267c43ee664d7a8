#!/usr/bin/env python3
"""What one more row costs onnxruntime's MatMulNBits on this CPU: the operator alone, for a
SmolLM2-sized projection (in 576, out 3072, block 32), at 1, 2, 4 and 8 rows, 4 and 8 bits,
accuracy levels 0 (fp32 compute) and 4 (int8 compute, what our int4 bundles use).

    python benchmarks/matmul_rows.py [--threads 2]

Batched decoding can only gain what this operator gives: if 4 rows cost 2.3x one row here, a
4-row batch of a model made of such MatMuls cannot reach 4/2.3 = 1.7x one stream's aggregate
from the MatMuls, whatever the runtime around it does.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    n_in, n_out, rows = 576, 3072, (1, 2, 4, 8)
    w = np.random.default_rng(0).standard_normal((n_in, n_out)).astype(np.float32) * 0.05
    print(f"MatMulNBits [{n_in} -> {n_out}], block 32, {args.threads} threads, onnxruntime {ort.__version__}: "
          "microseconds per call (ratio to one row)")
    for bits in (4, 8):
        for level in (0, 4):
            graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", n_in])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n_out])],
                                      [onnx.numpy_helper.from_array(w, "W")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, accuracy_level=level, bits=bits)
            q.process()
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.log_severity_level = 3
            session = ort.InferenceSession(q.model.model.SerializeToString(), so)
            times = []
            for m in rows:
                x = np.random.default_rng(m).standard_normal((m, n_in)).astype(np.float32)
                for _ in range(20):
                    session.run(None, {"x": x})
                t = time.perf_counter()
                for _ in range(args.repeats):
                    session.run(None, {"x": x})
                times.append((time.perf_counter() - t) / args.repeats * 1e6)
            print(f"{bits}-bit, accuracy level {level}: " + ", ".join(
                f"{m} rows {us:.0f} us ({us / times[0]:.2f}x)" for m, us in zip(rows, times)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
