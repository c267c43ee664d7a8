"""The importance-weighted 4-bit block search behind int4 (`int4_blocks`; what it minimises is in
its docstring, why in docs/design.md "Quantization").

Each block's candidate scales lie on two grids (llama.cpp's make_qx_quants search): symmetric,
the block's signed absmax rounded to a level from -9 to -7 in steps of 0.05 (-8 is plain absmax
rounding); and, with zero points, asymmetric, the block's range over 15 levels times 0.6 to 1.4
in steps of 0.04. The search is coarse to fine: every fifth point of each grid, then the two
neighbours on either side of each grid's coarse winner, per block. That evaluates 22 of the 62
grid points (13 of 41 without zero points) and finds a weighted error within a fraction of a
percent of the exhaustive search's (tests/exporters/test_int4_search.py measures it): the error
over the scale varies smoothly at the coarse step, and the fine step only settles the rounding.

Each candidate's error comes from the closed form sum(c x^2) - d (2 sum(c x q) - d sum(c q^2)) with
d refit by least squares, over cache-sized chunks of blocks laid out [block, blocks] so every pass
runs along contiguous memory; ties go to the candidate evaluated first. The candidates' passes run
in float32 on each block scaled to absmax 1 and weights c scaled to max 1 (neither changes which
candidate wins; float32 halves the bytes each pass moves and doubles the SIMD width: the search
takes about half the time it took in float64, benchmarks/results/int4_search.md): candidates
whose errors differ by less than about 1e-7 of the block's sum(c x^2) are ties to it. The chosen
levels' scale is refit with float64 sums.
"""

from __future__ import annotations

import numpy as np

_SYMMETRIC = -8 + np.arange(-20, 21) * 0.05  # the level the signed absmax maps to
_RANGE = np.linspace(0.6, 1.4, 21)  # the block's range over 15 levels, times these
# (coarse step, neighbours refined) per grid: every fifth symmetric point (-9, -8.75, ... -7),
# then two either side of the winner; every other range point (0.6, 0.68, ... 1.4), then one
# either side: the error varies faster over the range grid (the zero point rounds with it)
_PLAN = {True: (5, (-2, -1, 1, 2)), False: (2, (-1, 1))}
_CHUNK = 1 << 12  # blocks searched at once: their float32 copies stay in cache
_ROWS_CHUNK = 1 << 14  # blocks prepared at once (whole rows: sigma2 is per row); bounds memory


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
    symmetric candidates (z = 8) are always searched; zero_points adds asymmetric ones (z
    rounded), so a block takes a zero point only where it lowers that block's weighted error.
    onnxruntime's k-quant kept the base but not every adapter within verify's bound; weighing by
    importance alone (no sqrt term) lost an adapter's task check.
    """
    K, N = w.shape
    nb = -(-K // block_size)
    pad = nb * block_size - K  # onnxruntime pads K to whole blocks with zeros
    imp = np.pad(np.asarray(importance, np.float64), (0, pad)).reshape(nb, block_size)
    imp = imp + 1e-12 * max(float(imp.max()), 1e-300)  # a channel with no statistics still counts a little
    imp = (imp / imp.max(1, keepdims=True)).astype(np.float32)  # scaled per block (c is, below)
    u_all = np.zeros((N * nb, block_size), np.uint8)
    z_all = np.full(N * nb, 8, np.uint8)
    d_all = np.zeros(N * nb, np.float32)
    rows = max(1, _ROWS_CHUNK // nb)
    for r0 in range(0, N, rows):
        xr = np.pad(np.asarray(w[:, r0:r0 + rows].T, np.float32), ((0, 0), (0, pad)))
        sigma2 = np.repeat(np.einsum("ij,ij->i", xr, xr, dtype=np.float64) / K, nb)  # each row's mean square
        x = xr.reshape(-1, block_size)
        imp_rows = np.tile(imp, (len(xr), 1))
        base = r0 * nb
        for b0 in range(0, len(x), _CHUNK):
            b = slice(b0, b0 + _CHUNK)
            out = slice(base + b0, base + b0 + len(x[b]))
            _search(x[b], imp_rows[b], sigma2[b], zero_points, u_all[out], z_all[out], d_all[out])
    u = u_all.reshape(N, nb, block_size)
    packed = np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))
    zp = None
    if zero_points and (z_all != 8).any():
        z = np.pad(z_all.reshape(N, nb), ((0, 0), (0, nb % 2)), constant_values=8)
        zp = np.ascontiguousarray(z[:, 0::2] | (z[:, 1::2] << 4))
    return packed, d_all.reshape(N, nb), zp


class _Chunk:
    """Blocks x [B, block] and their weights c, scaled per block (x by its absmax, c by its
    largest) and laid out [block, B] in float32 for the candidates' passes, with what the
    candidates are built from (the sign of the signed absmax, the minimum lo, the range span), all
    of the scaled block."""

    def __init__(self, x: np.ndarray, imp: np.ndarray, sigma2: np.ndarray):
        hi, lo = x.max(1).astype(np.float64), x.min(1).astype(np.float64)
        m = x[np.arange(len(x)), np.abs(x).argmax(1)].astype(np.float64)  # the signed absmax, the first on a tie
        self.a = np.where(m == 0, 1.0, np.abs(m))  # the block's scale; an all-zero block keeps 1
        self.sign = np.where(m < 0, -1.0, 1.0)
        self.lo, self.span = lo / self.a, np.maximum((hi - lo) / self.a, 1e-30)
        self.xt = np.ascontiguousarray(x.T) * (1 / self.a).astype(np.float32)
        # the row's mean square beside the block's: past 1e30 (a block tiny beside its row) c is
        # that term alone to float32's precision, and float32 could not hold it
        ratio = np.minimum(sigma2 / (self.a * self.a), 1e30).astype(np.float32)
        ct = np.ascontiguousarray(imp.T) * np.sqrt(ratio + self.xt * self.xt)
        cmax = ct.max(0)
        self.ct = np.divide(ct, np.where(cmax > 0, cmax, 1), out=ct)  # max 1 per block (0 where all are)
        self.cx = self.ct * self.xt
        self.sxx = np.einsum("kb,kb->b", self.cx, self.xt, dtype=np.float64)
        self.q = np.empty_like(self.xt)  # scratch for one candidate's levels

    def levels(self, symmetric: bool, grid_value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(q, z): signed levels u - z [block, B] (float32, in the scratch buffer) and zero points
        [B] for each block's candidate, grid_value [B] a point of the symmetric or the range grid."""
        q = self.q
        if symmetric:
            np.multiply(self.xt, (grid_value * self.sign).astype(np.float32), out=q)
            np.rint(q, out=q)
            return np.clip(q, -8, 7, out=q), np.full(len(self.sign), 8.0)
        d0 = self.span * grid_value / 15
        z = np.clip(np.rint(-self.lo / d0), 0, 15)
        z32 = z.astype(np.float32)
        np.multiply(self.xt, (1 / d0).astype(np.float32), out=q)
        np.rint(q, out=q)
        np.add(q, z32, out=q)
        np.clip(q, 0, 15, out=q)  # scalar bounds: numpy's fast path (per-block bounds are not)
        return np.subtract(q, z32, out=q), z

    def error(self, symmetric: bool, grid_value: np.ndarray) -> np.ndarray:
        """Each block's weighted error [B] for its candidate, d refit by least squares."""
        q, _ = self.levels(symmetric, grid_value)
        sxq = np.einsum("kb,kb->b", q, self.cx).astype(np.float64)
        sqq = np.einsum("kb,kb,kb->b", q, q, self.ct).astype(np.float64)
        d = np.divide(sxq, sqq, out=np.zeros_like(sxq), where=sqq > 0)
        return self.sxx - d * (2 * sxq - d * sqq)


def _grid_search(chunk: _Chunk, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(best error [B], best grid index [B]) over one grid, coarse then fine."""
    grid = _SYMMETRIC if symmetric else _RANGE
    coarse_step, refine = _PLAN[symmetric]
    B = len(chunk.sign)
    best, idx = np.full(B, np.inf), np.zeros(B, np.int64)
    for i in range(0, len(grid), coarse_step):
        err = chunk.error(symmetric, np.full(B, grid[i]))
        better = err < best  # a non-finite error never wins
        best[better], idx[better] = err[better], i
    coarse = idx.copy()
    for step in refine:
        j = coarse + step
        inside = (j >= 0) & (j < len(grid))
        j = np.clip(j, 0, len(grid) - 1)
        err = chunk.error(symmetric, grid[j])
        better = inside & (err < best)
        best[better], idx[better] = err[better], j[better]
    return best, idx


def _search(x: np.ndarray, imp: np.ndarray, sigma2: np.ndarray, zero_points: bool, u: np.ndarray,
            z_out: np.ndarray, d_out: np.ndarray) -> None:
    """Fill u (levels, uint8), z_out and d_out (the scales) for blocks x [B, block]."""
    chunk = _Chunk(x, imp, sigma2)
    best, idx = _grid_search(chunk, True)
    asym = np.zeros(len(x), bool)
    if zero_points:
        best_r, idx_r = _grid_search(chunk, False)
        asym = best_r < best  # a zero point only where it lowers the block's error
        idx = np.where(asym, idx_r, idx)
    q, z = chunk.levels(True, _SYMMETRIC[idx])
    if asym.any():
        q, z = q.copy(), z.copy()
        qa, za = chunk.levels(False, _RANGE[np.where(asym, idx, 0)])  # the symmetric rows' values unused
        np.copyto(q, qa, where=asym)
        z[asym] = za[asym]
    # the chosen levels' scale, refit in float64 sums
    sxq = np.einsum("kb,kb->b", q, chunk.cx, dtype=np.float64)
    sqq = np.einsum("kb,kb,kb->b", q, q, chunk.ct, dtype=np.float64)
    d = np.divide(sxq, sqq, out=np.zeros_like(sxq), where=sqq > 0)
    u[:] = (q + z.astype(np.float32)).T
    z_out[:], d_out[:] = z, d * chunk.a
