#!/usr/bin/env python3
"""What one more row costs onnxruntime's CPU matrix products on this machine: SmolLM2-sized
projections (576 -> 1536 and back, alternating, 20 per graph so that one session.run's own cost
is shared), at 1, 2, 4 and 8 rows, for every operator onnxruntime offers a quantized decode step:

- MatMulNBits, 4 bits, block 32, accuracy level 4 (int8 compute): what our int4 bundles use;
- the same at block 128, and at accuracy level 0 (fp32 compute);
- MatMulNBits, 8 bits, block 32, accuracy level 4: what the default int4 keeps at 8 bits;
- DynamicQuantizeMatMul: int8 weights with one scale per column, the activation quantized per
  tensor (onnxruntime's general int8 GEMM, MLAS QGEMM);
- MatMul on fp32 weights (the dequantized model).

    python benchmarks/matmul_rows.py [--threads 2] [--rounds 15]

Every configuration is timed in every round, one after the other (interleaved; the row counts
in a shuffled order, each after 10 warm-up runs), and the median over rounds is printed. Batched decoding can only gain what these operators give: if 4 rows cost
2.3x one row here, a 4-row batch of a model made of such MatMuls cannot reach 4 / 2.3 = 1.7x one
stream's aggregate from the MatMuls, whatever the runtime around it does.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

N_IN, N_MID, CHAIN, ROWS = 576, 1536, 20, (1, 2, 4, 8)


def _chain(weights, node):
    """A graph of CHAIN products x -> W0 -> W1 -> ..., alternating 576 -> 1536 -> 576."""
    from onnx import TensorProto, helper

    nodes, inits, cur = [], [], "x"
    for i, w in enumerate(weights):
        made, extra = node(i, cur, f"h{i}", w)
        nodes.append(made)
        inits.extend(extra)
        cur = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", N_IN])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["M", N_IN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def _models(weights):
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def fp32(i, x, y, w):
        return helper.make_node("MatMul", [x, f"W{i}"], [y]), [numpy_helper.from_array(w, f"W{i}")]

    def int8_columns(i, x, y, w):
        scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        return (helper.make_node("DynamicQuantizeMatMul", [x, f"W{i}", f"S{i}"], [y], domain="com.microsoft"),
                [numpy_helper.from_array(q, f"W{i}"), numpy_helper.from_array(scale, f"S{i}")])

    float_model = _chain(weights, fp32)
    out = {}
    for label, bits, block, level in (("MatMulNBits 4-bit, block 32, accuracy 4 (our int4)", 4, 32, 4),
                                      ("MatMulNBits 4-bit, block 128, accuracy 4", 4, 128, 4),
                                      ("MatMulNBits 4-bit, block 32, accuracy 0 (fp32 compute)", 4, 32, 0),
                                      ("MatMulNBits 8-bit, block 32, accuracy 4", 8, 32, 4)):
        q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(float_model.SerializeToString()), block_size=block,
                                 is_symmetric=True, accuracy_level=level, bits=bits)
        q.process()
        out[label] = q.model.model
    out["DynamicQuantizeMatMul int8, scale per column"] = _chain(weights, int8_columns)
    out["MatMul fp32"] = float_model
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=30, help="session runs per configuration per round")
    args = ap.parse_args()
    for name in ("threads", "rounds", "calls"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    logging.disable(logging.INFO)  # the quantizer logs every node
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((N_IN, N_MID) if i % 2 == 0 else (N_MID, N_IN)) * 0.05).astype(np.float32)
               for i in range(CHAIN)]
    sessions = {}
    for label, model in _models(weights).items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.log_severity_level = 3
        sessions[label] = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    xs = {m: rng.standard_normal((m, N_IN)).astype(np.float32) for m in ROWS}
    times = {label: {m: [] for m in ROWS} for label in sessions}
    order = list(ROWS)
    for _ in range(args.rounds):
        for label, session in sessions.items():
            rng.shuffle(order)  # no row count always comes first after a switch of session
            for m in order:
                for _ in range(10):
                    session.run(None, {"x": xs[m]})
                t = time.perf_counter()
                for _ in range(args.calls):
                    session.run(None, {"x": xs[m]})
                times[label][m].append((time.perf_counter() - t) / args.calls / CHAIN * 1e6)
    print(f"{N_IN} <-> {N_MID} products, {CHAIN} per graph, {args.threads} threads, onnxruntime {ort.__version__}, "
          f"median of {args.rounds} interleaved rounds: microseconds per product (ratio to one row)")
    for label, per_rows in times.items():
        med = {m: float(np.median(v)) for m, v in per_rows.items()}
        print(f"{label}: " + ", ".join(f"{m} rows {med[m]:.1f} us ({med[m] / med[1]:.2f}x)" for m in ROWS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
