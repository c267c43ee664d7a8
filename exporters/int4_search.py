"""The importance-weighted 4-bit block search behind int4 (`int4_blocks`; what it minimises is in
its docstring, why in docs/design.md "Quantization").

The search is defined block by block: every candidate rounding in a fixed order, each refit by
least squares, a candidate kept when its weighted error beats the best so far (held as float32).
Evaluating every candidate that way is many passes over each block per candidate, so it runs in
two stages that give the same blocks, bit for bit:

1. Screening, in vectorised passes over cache-sized chunks: each candidate's error from the closed
   form sum(c x^2) - d (2 sum(c x q) - d sum(c q^2)), with a bound on how far float64 rounding can
   put it from the error the definition computes. A candidate whose lower bound lies above every
   candidate's upper bound by more than float32 rounding cannot be the one the definition keeps.
2. The definition itself, candidate by candidate in order, on the few candidates per block that
   screening left. The best so far is the minimum of the float32 errors seen, so the candidates
   screened out, all worse than the winner by more than float32 rounding, change nothing.

Blocks the bound does not cover (non-finite values, errors outside float32's normal range, a
rounding with sum(c q^2) near the 1e-30 floor) keep every candidate.
"""

from __future__ import annotations

import numpy as np

# Scale candidates per 4-bit block (llama.cpp's make_qx_quants search): the level the block's
# signed absmax is rounded to, -9 ... -7 in steps of 0.05 (-8 is plain absmax rounding).
_CANDIDATES = -8 + np.arange(-20, 21) * 0.05
# Asymmetric candidates (zero_points): the block's range over 15 levels, times these.
_RANGE_CANDIDATES = np.linspace(0.6, 1.4, 21)
_BLOCKS_PER_CHUNK = 1 << 14  # blocks the exact stage takes at once: bounds memory
_SCREEN_BLOCKS = 1 << 11  # blocks screened at once: their float64 copies stay in cache
# Relative bound on the screening's rounding error: a sum of n products is off by at most about
# (n + 21) ulp of the magnitudes summed, so it holds for blocks up to _MAX_SCREENED, with a margin.
_BOUND = 1e-11
_MAX_SCREENED = 4096
_F32_ULP = 2.0 ** -21  # beyond float32's relative rounding (2^-24), with a margin


def int4_blocks(w: np.ndarray, importance: np.ndarray, block_size: int,
                zero_points: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """4-bit blocks for a MatMul weight w [K, N] (K the input axis), in MatMulNBits' layout:
    packed uint8 [N, K/block, block/2] (low nibble first), scales float32 [N, K/block], and,
    with zero_points, the blocks' zero points packed uint8 [N, ceil(blocks/2)] (low nibble
    first; 8 is symmetric), or None where every block kept 8.

    onnxruntime's quantizers have no way to take activation statistics for a CPU 4-bit build
    (its default rounds each block from its absmax; RTN and k-quant weigh by the weights alone;
    GPTQ and AWQ need a calibration reader over the whole ONNX graph, and AWQ a GPU), so this is
    ours, after llama.cpp's importance-matrix Q4_0: per block, the scale candidate that minimises
    sum_k c_k (w_k - d (u_k - z))^2 with c_k = importance_k * sqrt(sigma2 + w_k^2) (sigma2 the
    mean square of the weight's row), d refit by least squares for the chosen rounding. The
    symmetric candidates (z = 8) are always searched; zero_points adds asymmetric ones (the
    block's range over 15 levels, x 0.6 ... 1.4, z rounded), so a block takes a zero point only
    where it lowers that block's weighted error. onnxruntime's k-quant kept the base but not every
    adapter within verify's bound; weighing by importance alone (no sqrt term) lost an adapter's
    task check.
    """
    K, N = w.shape
    nb = -(-K // block_size)
    pad = nb * block_size - K  # onnxruntime pads K to whole blocks with zeros
    imp = np.pad(np.asarray(importance, np.float64), (0, pad)).reshape(nb, block_size)
    imp = (imp + 1e-12 * max(float(imp.max()), 1e-30)).astype(np.float32)  # no channel counts nothing
    u_all = np.zeros((N * nb, block_size), np.uint8)
    z_all = np.full(N * nb, 8, np.uint8)
    d_all = np.zeros(N * nb, np.float32)
    rows = max(1, _BLOCKS_PER_CHUNK // nb)  # whole rows of blocks: sigma2 is per row
    for r0 in range(0, N, rows):
        xr = np.pad(np.ascontiguousarray(w[:, r0:r0 + rows].T, np.float32), ((0, 0), (0, pad)))
        sigma2 = (xr ** 2).sum(1) / K  # each row's mean square
        x = xr.reshape(-1, block_size)
        wt = np.tile(imp, (len(xr), 1)) * np.sqrt(np.repeat(sigma2, nb)[:, None] + x * x)
        sl = slice(r0 * nb, r0 * nb + len(x))
        _search(x, wt, zero_points, u_all[sl], z_all[sl], d_all[sl])
    u = u_all.reshape(N, nb, block_size)
    packed = np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))
    zp = None
    if zero_points and (z_all != 8).any():
        z = np.pad(z_all.reshape(N, nb), ((0, 0), (0, nb % 2)), constant_values=8)
        zp = np.ascontiguousarray(z[:, 0::2] | (z[:, 1::2] << 4))
    return packed, d_all.reshape(N, nb), zp


class _Blocks:
    """What the candidates of blocks x [B, block] (float32) are built from: the signed absmax m,
    the minimum lo and the range span, as float64 vectors."""

    def __init__(self, x: np.ndarray):
        m = x[np.arange(len(x)), np.abs(x).argmax(1)]
        self.m = np.where(m == 0, 1.0, m).astype(np.float64)
        self.lo = x.min(1).astype(np.float64)
        self.span = np.maximum(x.max(1) - x.min(1), np.float32(1e-30)).astype(np.float64)

    def levels(self, x: np.ndarray, i: int, rows=slice(None), out: np.ndarray | None = None):
        """(q, z): candidate i's signed levels u - z for blocks x [len(rows), block] and its zero
        point (8.0, or a column of them). Candidates below len(_CANDIDATES) are symmetric."""
        if i < len(_CANDIDATES):
            q = np.multiply(x, (_CANDIDATES[i] / self.m[rows])[:, None], out=out)
            return np.clip(np.rint(q, out=q), -8, 7, out=q), 8.0
        d0 = (self.span[rows] * _RANGE_CANDIDATES[i - len(_CANDIDATES)] / 15)[:, None]
        z = np.clip(np.rint(-self.lo[rows, None] / d0), 0, 15)
        q = np.rint(np.divide(x, d0, out=out), out=out)
        return np.subtract(np.clip(np.add(q, z, out=q), 0, 15, out=q), z, out=q), z


def _search(x: np.ndarray, wt: np.ndarray, zero_points: bool, u: np.ndarray, z_out: np.ndarray,
            d_out: np.ndarray) -> None:
    """Fill u (levels, uint8), z_out and d_out (the scales) for blocks x with weights wt [B, block]."""
    n = len(_CANDIDATES) + (len(_RANGE_CANDIDATES) if zero_points else 0)
    blocks = _Blocks(x)
    keep = np.ones((n, len(x)), bool)
    for b0 in range(0, len(x) if x.shape[1] <= _MAX_SCREENED else 0, _SCREEN_BLOCKS):
        b = slice(b0, b0 + _SCREEN_BLOCKS)
        keep[:, b] = _screen(x[b], wt[b], blocks, b, n)
    best = np.full(len(x), np.inf, np.float32)
    seen_u, seen_z = np.full(x.shape, -1, np.int8), np.full(len(x), -1.0)  # per block, the last evaluated
    for i in range(n):  # the definition, on the candidates screening kept
        r = np.flatnonzero(keep[i])
        if not len(r):
            continue
        q, z = blocks.levels(x[r], i, r)
        z = np.broadcast_to(z, (len(r), 1))
        levels = (q + z).astype(np.int8)
        # a rounding equal to the one last evaluated for its block has the same error and scale:
        # kept or not, the block comes out the same
        new = (levels != seen_u[r]).any(1) | (z[:, 0] != seen_z[r])
        r, q, z, levels = r[new], q[new], z[new], levels[new]
        seen_u[r], seen_z[r] = levels, z[:, 0]
        xr, wr = x[r], wt[r]
        wq = wr * q
        d = (wq * xr).sum(1) / np.maximum((wq * q).sum(1), 1e-30)
        err = (wr * (xr - d[:, None] * q) ** 2).sum(1)
        better = err < best[r]
        rb = r[better]
        best[rb] = err[better]
        d_out[rb] = d[better]
        u[rb] = levels[better]
        z_out[rb] = z[better, 0]


def _screen(x: np.ndarray, wt: np.ndarray, blocks: _Blocks, rows: slice, n: int) -> np.ndarray:
    """[n, B] bool: which candidates of blocks x can be the one the definition keeps."""
    # [block, B] in memory: each candidate's passes run along B, its sums add whole rows
    xt, wtt = np.ascontiguousarray(x.T, np.float64), np.ascontiguousarray(wt.T, np.float64)
    p = wtt * xt
    sxx = np.einsum("kb,kb->b", p, xt)
    sxq, sqq = np.empty((n, len(x))), np.empty((n, len(x)))
    qt = np.empty_like(xt)
    for i in range(n):
        blocks.levels(xt.T, i, rows, out=qt.T)  # the same elementwise operations, transposed
        np.einsum("kb,kb->b", qt, p, out=sxq[i])
        np.einsum("kb,kb,kb->b", qt, qt, wtt, out=sqq[i])
    d = sxq / np.maximum(sqq, 1e-30)
    err = sxx - d * (2 * sxq - d * sqq)
    # the magnitudes rounding errors scale with, sxx + 2 |d| sqrt(sxx sqq) + d^2 sqq, at most doubled
    bound = _BOUND * 2 * (sxx + d * d * sqq)
    lower, upper = err - bound, err + bound
    ceiling = upper.min(0)
    keep = lower <= ceiling * (1 + _F32_ULP)
    uncovered = ((sqq < 1e-28).any(0) | ~np.isfinite(upper).all(0)  # err and bound finite
                 | (ceiling >= 1e37) | (lower.min(0) <= 1e-35) | (wt < 0).any(1))
    keep[:, uncovered] = True
    return keep
