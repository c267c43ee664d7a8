"""The screened 4-bit search gives the blocks of the search as defined, bit for bit."""

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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zero_points", [False, True])
def test_screened_search_gives_the_defined_blocks_bit_for_bit(kind, zero_points, monkeypatch):
    rng = np.random.default_rng(KINDS.index(kind))
    # small chunks, so that blocks cross chunk and screening boundaries within these small weights
    monkeypatch.setattr(int4_search, "_BLOCKS_PER_CHUNK", 96)
    monkeypatch.setattr(int4_search, "_SCREEN_BLOCKS", 40)
    for k, n in SHAPES:
        w = _weights(kind, k, n, rng)
        for importance in (np.ones(k), rng.uniform(0.1, 5, k), np.where(rng.random(k) < 0.1, 50.0, 0.0)):
            for block in (16, 32, 64):
                got = int4_blocks(w, importance, block, zero_points)
                want = _reference(w, importance, block, zero_points)
                for a, b, what in zip(_unpacked(*got), want, ("levels", "zero points", "scales")):
                    assert a.dtype == b.dtype and np.array_equal(a, b), f"{what} differ: {kind} {k}x{n} block {block}"
                assert (got[2] is None) == (not zero_points or (want[1] == 8).all())


def test_screening_leaves_few_candidates_per_block_of_ordinary_weights():
    rng = np.random.default_rng(0)
    x = (rng.standard_t(5, size=(2048, 32)) * 0.02).astype(np.float32)
    wt = rng.lognormal(0, 1.5, 32).astype(np.float32) * np.sqrt(np.float32(4e-4) + x * x)
    n = len(int4_search._CANDIDATES) + len(int4_search._RANGE_CANDIDATES)
    keep = int4_search._screen(x, wt, int4_search._Blocks(x), slice(None), n)
    assert keep.any(0).all()  # every block keeps its winner
    assert keep.sum(0).mean() < 6  # of 62: the exact pass is a small part of the work


def test_blocks_longer_than_the_screening_covers_get_every_candidate(monkeypatch):
    rng = np.random.default_rng(9)
    w, importance = rng.normal(size=(96, 40)).astype(np.float32), rng.uniform(0.1, 5, 96)
    # two-valued blocks: consecutive zero-point candidates round them to the same levels u with
    # different zero points, so they differ, and the later one wins
    w[:, :2] = np.tile(np.float32([-1.0, 1.5]), 48)[:, None]
    monkeypatch.setattr(int4_search, "_MAX_SCREENED", 16)  # blocks of 32 are then beyond it
    monkeypatch.setattr(int4_search, "_screen", None)  # and never screened
    got = int4_blocks(w, importance, 32, zero_points=True)
    for a, b in zip(_unpacked(*got), _reference(w, importance, 32, True)):
        assert np.array_equal(a, b)
