"""The coarse-to-fine 4-bit search finds blocks within a fraction of a percent of the exhaustive
search's weighted error, never worse than plain absmax rounding, with least-squares scales."""

import numpy as np
import pytest

from edgepeft.exporters import int4_search
from edgepeft.exporters.int4_search import int4_blocks


def _reference(w, importance, block_size, zero_points):
    """The definition, written plainly: every candidate of every block in order, a candidate kept
    where its weighted error beats the best so far (held as float32). Returns (u, z, d) per block."""
    K, N = w.shape
    nb = -(-K // block_size)
    x = np.pad(np.ascontiguousarray(w.T, np.float32), ((0, 0), (0, nb * block_size - K)))  # row sums in row order
    sigma2 = np.repeat((x ** 2).sum(1) / K, nb)
    x = x.reshape(N * nb, block_size)
    imp = np.pad(np.asarray(importance, np.float64), (0, nb * block_size - K))
    imp = np.tile((imp + 1e-12 * max(imp.max(), 1e-30)).astype(np.float32).reshape(nb, block_size), (N, 1))
    wt = imp * np.sqrt(sigma2[:, None] + x * x)
    m = x[np.arange(len(x)), np.abs(x).argmax(1)].astype(np.float64)
    m[m == 0] = 1.0
    lo, span = x.min(1).astype(np.float64), np.maximum(x.max(1) - x.min(1), np.float32(1e-30)).astype(np.float64)
    roundings = [(np.clip(np.rint(x * (c / m)[:, None]), -8, 7), np.full(len(x), 8.0))
                 for c in -8 + np.arange(-20, 21) * 0.05]
    for f in np.linspace(0.6, 1.4, 21) if zero_points else ():
        d0 = span * f / 15
        z = np.clip(np.rint(-lo / d0), 0, 15)
        roundings.append((np.clip(np.rint(x / d0[:, None]) + z[:, None], 0, 15) - z[:, None], z))
    best = np.full(len(x), np.inf, np.float32)
    u, z_best, d_best = np.zeros(x.shape, np.uint8), np.full(len(x), 8, np.uint8), np.zeros(len(x), np.float32)
    for q, z in roundings:
        wq = wt * q
        d = (wq * x).sum(1) / np.maximum((wq * q).sum(1), 1e-30)
        err = (wt * (x - d[:, None] * q) ** 2).sum(1)
        better = err < best
        best[better], d_best[better], z_best[better] = err[better], d[better], z[better]
        u[better] = q[better] + z[better, None]
    return u, z_best, d_best


def _unpacked(packed, scales, zp):
    """(u, z, d) per block from int4_blocks' MatMulNBits layout."""
    n, nb = scales.shape
    u = np.stack([packed & 15, packed >> 4], -1).reshape(n * nb, -1)
    z = np.full(n * nb, 8, np.uint8) if zp is None else np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :nb].ravel()
    return u, z, scales.ravel()


def _weights(kind, k, n, rng):
    w = rng.normal(size=(k, n)).astype(np.float32)
    if kind == "zero-and-constant-blocks":
        w[: min(k, 32)] = 0
        w[:, 0] = 0.37
        w[:, -1] = -2.5
    elif kind == "tiny":
        w *= np.float32(1e-30)  # squares underflow float32: every weight c_k is 0
    elif kind == "small":
        w *= np.float32(1e-18)
    elif kind == "huge":
        w *= np.float32(1e17)
    elif kind == "heavy-tailed":
        w = (rng.standard_t(3, size=(k, n)) * 0.02).astype(np.float32)
    elif kind == "on-the-grid":  # exact 4-bit values: many candidates round them alike
        w = (rng.integers(-8, 8, size=(k, n)) * 0.125).astype(np.float32)
    elif kind == "one-signed":
        w = np.abs(w) + 0.5
    return w


KINDS = ["normal", "zero-and-constant-blocks", "tiny", "small", "huge", "heavy-tailed", "on-the-grid", "one-signed"]
SHAPES = [(80, 24), (33, 7), (17, 5), (1000, 3), (256, 64)]  # K not whole blocks, odd, shorter than a block, long rows


def _weighted_errors(w, importance, block_size, u, z, d):
    """Each block's error sum_k c_k (w_k - d (u_k - z))^2 in float64 (int4_blocks' c_k, with its
    floor for channels of no importance)."""
    K, N = w.shape
    importance = np.asarray(importance, np.float64) + 1e-12 * max(float(np.max(importance)), 1e-300)
    nb = -(-K // block_size)
    x = np.pad(w.T.astype(np.float64), ((0, 0), (0, nb * block_size - K)))
    sigma2 = np.repeat((x ** 2).sum(1) / K, nb)[:, None]
    x = x.reshape(-1, block_size)
    c = np.tile(np.pad(np.asarray(importance, np.float64), (0, nb * block_size - K)).reshape(nb, block_size), (N, 1))
    c = c * np.sqrt(sigma2 + x * x)
    return (c * (x - (u.astype(np.float64) - z[:, None]) * d.astype(np.float64)[:, None]) ** 2).sum(1), c, x


def _absmax_errors(w, importance, block_size):
    """Each block's error with plain absmax rounding (its signed absmax to -8), d refit."""
    _, c, x = _weighted_errors(w, importance, block_size, np.zeros((1, block_size)), np.zeros(1), np.zeros(1))
    m = x[np.arange(len(x)), np.abs(x).argmax(1)]
    q = np.clip(np.rint(x * (-8 / np.where(m == 0, 1, m))[:, None]), -8, 7)
    sqq = (c * q * q).sum(1)
    d = np.divide((c * x * q).sum(1), sqq, out=np.zeros(len(x)), where=sqq > 0)
    return (c * (x - d[:, None] * q) ** 2).sum(1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zero_points", [False, True])
def test_search_is_near_the_exhaustive_one_and_never_worse_than_absmax(kind, zero_points, monkeypatch):
    rng = np.random.default_rng(KINDS.index(kind))
    monkeypatch.setattr(int4_search, "_CHUNK", 40)  # blocks cross chunk boundaries in these small weights
    monkeypatch.setattr(int4_search, "_ROWS_CHUNK", 96)
    total = {"got": 0.0, "exhaustive": 0.0, "slack": 0.0}
    for k, n in SHAPES:
        w = _weights(kind, k, n, rng)
        for importance in (np.ones(k), rng.uniform(0.1, 5, k), np.where(rng.random(k) < 0.1, 50.0, 0.0)):
            for block in (16, 32, 64):
                packed, scales, zp = int4_blocks(w, importance, block, zero_points)
                u, z, d = _unpacked(packed, scales, zp)
                assert np.isfinite(d).all() and (z == 8).all() != (zp is not None)
                got, c, x = _weighted_errors(w, importance, block, u, z, d)
                # the search compares candidates in float32: errors closer than about 1e-7 of
                # sum(c x^2) are ties to it (the worst seen here: 3e-7, on the "huge" weights)
                slack = 1e-6 * (c * x * x).sum(1) + 1e-300
                exhaustive = _weighted_errors(w, importance, block, *_reference(w, importance, block, zero_points))[0]
                absmax = _absmax_errors(w, importance, block)
                where = f"{kind} {k}x{n} block {block}"
                assert np.all(got <= absmax * (1 + 1e-6) + slack), where
                for key, v in (("got", got), ("exhaustive", exhaustive), ("slack", slack)):
                    total[key] += v.sum()
    # over every weight of a kind (a few dozen blocks alone vary more); the exhaustive search rounds
    # its errors to float32, so on degenerate scales it is the worse one
    assert total["got"] <= total["exhaustive"] * (1.005 if not zero_points else 1.02) + total["slack"], kind


def test_scales_are_the_least_squares_fit_of_the_chosen_levels():
    rng = np.random.default_rng(4)
    k, n = 96, 40
    w, importance = (rng.standard_t(4, size=(k, n)) * 0.02).astype(np.float32), rng.lognormal(0, 1, k)
    u, z, d = _unpacked(*int4_blocks(w, importance, 32, zero_points=True))
    _, c, x = _weighted_errors(w, importance, 32, u, z, d)
    q = u.astype(np.float64) - z[:, None]
    np.testing.assert_allclose(d, (c * x * q).sum(1) / (c * q * q).sum(1), rtol=1e-6)
    assert (z != 8).any() and (z == 8).any()  # both kinds of blocks were chosen


def test_exact_grids_come_back_exactly():
    """Blocks whose weights already lie on a 4-bit grid, symmetric or offset, reconstruct exactly."""
    rng = np.random.default_rng(5)
    levels = rng.integers(0, 16, size=(64, 30)).astype(np.float32)
    levels[0], levels[1] = 0, 15  # every column spans the whole 16 levels
    w = (levels - 3) * np.float32(0.25)  # offset grid: needs zero point 3
    packed, scales, zp = int4_blocks(w, rng.uniform(0.5, 2, 64), 32, zero_points=True)
    u, z, d = _unpacked(packed, scales, zp)
    deq = ((u.astype(np.float32) - z[:, None]) * d[:, None]).reshape(30, 64).T
    np.testing.assert_allclose(deq, w, atol=1e-6)
