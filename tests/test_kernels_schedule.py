"""The kernels' tiling schedule against brute force: passes cover each pattern exactly once, block lists
visit every visible pair and nothing else, and the merge of two partial softmaxes is exact."""

import numpy as np
import pytest

from kernels import patterns
from kernels.schedule import (FULL, PARTIAL, SKIP, DiagonalMask, SummaryMask, forward_schedule, merge_partials,
                              pass_pairs, passes_for, residue_positions, schedule_pairs, summary_positions,
                              transposed_schedule)

# (window, stride, T): window == stride, window < stride, window > stride, window not a multiple of
# stride, tiny T/S (packed residues), window >= T (no strided pass left), stride 1.
LOCAL_STRIDED_CASES = [
    (4, 4, 32), (3, 8, 64), (8, 3, 48), (10, 4, 64), (5, 16, 128), (16, 4, 64), (7, 2, 40),
    (64, 64, 512), (40, 16, 96), (100, 4, 64), (1, 1, 16), (2, 1, 24), (1, 5, 35),
]


def _natural_mask(pattern, T):
    pos = np.arange(T)
    return pattern.mask(pos, pos)


@pytest.mark.parametrize("window,stride,T", LOCAL_STRIDED_CASES)
def test_local_strided_passes_partition_the_mask(window, stride, T):
    pattern = patterns.local_strided(window, stride)
    counts = sum(pass_pairs(p, T).astype(int) for p in passes_for(pattern, T))
    np.testing.assert_array_equal(counts, _natural_mask(pattern, T).astype(int))


@pytest.mark.parametrize("pattern,T", [
    (patterns.dense(), 40), (patterns.local(1), 16), (patterns.local(7), 40), (patterns.local(64), 32),
    (patterns.strided(1), 16), (patterns.strided(4), 32), (patterns.strided(5), 35),
])
def test_single_pass_patterns_match_the_mask(pattern, T):
    (only,) = passes_for(pattern, T)
    np.testing.assert_array_equal(pass_pairs(only, T), _natural_mask(pattern, T))


def test_residue_layout_is_a_permutation_grouping_residues():
    pos = residue_positions(24, 4)  # P = 6 rows per residue
    assert sorted(pos.tolist()) == list(range(24))
    np.testing.assert_array_equal(pos[:6], [0, 4, 8, 12, 16, 20])
    np.testing.assert_array_equal(pos[6:12], [1, 5, 9, 13, 17, 21])


def test_seq_multiple_is_enforced():
    with pytest.raises(ValueError, match="multiple of 8"):
        passes_for(patterns.local_strided(8, 8), 60)


@pytest.mark.parametrize("block,c,T", [(8, 2, 32), (4, 4, 16), (16, 1, 64), (8, 3, 8), (5, 2, 35)])
def test_fixed_passes_partition_the_mask(block, c, T):
    pattern = patterns.fixed(block, c)
    counts = sum(pass_pairs(p, T).astype(int) for p in passes_for(pattern, T))
    np.testing.assert_array_equal(counts, _natural_mask(pattern, T).astype(int))


def test_summary_keys_are_the_last_c_of_every_block():
    np.testing.assert_array_equal(summary_positions(24, 8, 3), [5, 6, 7, 13, 14, 15, 21, 22, 23])


MASKS = [
    DiagonalMask(64), DiagonalMask(64, 0, 9), DiagonalMask(64, 0, 0), DiagonalMask(8, 2),
    DiagonalMask(4, 1), DiagonalMask(16, 0), DiagonalMask(12, 3), DiagonalMask(64, 0, 20),
]


def _check_schedule(dense, sched, tsched, bq, bk):
    """Every visible pair is covered, each visited block holds a visible pair and is FULL iff all its pairs
    are, no block twice, padding after the real steps; the transposed lists visit the same blocks."""
    covered = schedule_pairs(sched, bq, bk, *dense.shape)
    assert not (dense & ~covered).any()
    for t in range(sched.index.shape[0]):
        seen = set()
        for s in range(sched.steps):
            kind, c = sched.kind[t, s], sched.index[t, s]
            tile = dense[t * bq:(t + 1) * bq, c * bk:(c + 1) * bk]
            if kind == SKIP:
                continue
            assert c not in seen, "a block is visited twice"
            seen.add(c)
            assert tile.any()
            assert (kind == FULL) == tile.all(), (t, c, kind)
            assert kind in (PARTIAL, FULL)
        # padding steps repeat the last visited block (no new fetch) and come after the real ones
        real = sched.kind[t] != SKIP
        assert not (~real[:-1] & real[1:]).any()
        if real.any() and not real.all():
            assert (sched.index[t, ~real] == sched.index[t, real][-1]).all()
    assert tsched.index.shape[0] == dense.shape[1] // bk
    fwd_pairs = {(t, int(sched.index[t, s]), int(sched.kind[t, s]))
                 for t in range(sched.index.shape[0]) for s in range(sched.steps) if sched.kind[t, s]}
    bwd_pairs = {(int(tsched.index[c, s]), c, int(tsched.kind[c, s]))
                 for c in range(tsched.index.shape[0]) for s in range(tsched.steps) if tsched.kind[c, s]}
    assert fwd_pairs == bwd_pairs


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("bq,bk", [(8, 8), (16, 8), (8, 32), (32, 16)])
def test_block_schedule_covers_exactly_the_visible_blocks(mask, bq, bk):
    T = 96  # a multiple of every tile; with seg_len 64 the last segment is cut short, still valid
    _check_schedule(mask.dense(T), forward_schedule(mask, T, bq, bk), transposed_schedule(mask, T, bq, bk), bq, bk)


@pytest.mark.parametrize("block,c", [(8, 2), (16, 16), (32, 3), (4, 1)])
@pytest.mark.parametrize("bq,bk", [(8, 8), (16, 8), (8, 32), (32, 16)])
def test_summary_schedule_covers_exactly_the_visible_blocks(block, c, bq, bk):
    T = 96
    n_keys = -(-(T // block * c) // bk) * bk  # gathered keys padded to whole blocks: never visible
    mask = SummaryMask(block, c)
    dense = mask.dense(T, n_keys)
    assert not dense[:, T // block * c:].any()
    _check_schedule(dense, forward_schedule(mask, T, bq, bk, n_keys), transposed_schedule(mask, T, bq, bk, n_keys),
                    bq, bk)


def test_band_schedule_skips_far_blocks():
    # window 16 with 16-wide tiles: each query tile visits its own block (partial) and the one before
    sched = forward_schedule(DiagonalMask(128, 0, 15), 128, 16, 16)
    assert sched.steps == 2
    np.testing.assert_array_equal(sched.index[3], [2, 3])
    np.testing.assert_array_equal(sched.kind[3], [PARTIAL, PARTIAL])


@pytest.mark.parametrize("mask,n_keys", [(DiagonalMask(96, 0), None), (DiagonalMask(96, 0, 15), None),
                                         (DiagonalMask(12, 1), None), (SummaryMask(16, 4), 32)])
def test_visit_list_is_the_schedule_without_padding(mask, n_keys):
    """One grid step per visited block, each tile's steps consecutive and flagged first / last; a tile
    with nothing to visit keeps one SKIP step (it must still write its zeros and lse = -inf)."""
    for sched in (forward_schedule(mask, 96, 16, 8, n_keys), transposed_schedule(mask, 96, 16, 8, n_keys)):
        visits = sched.visits()
        tiles = sched.index.shape[0]
        expect = []
        for t in range(tiles):
            real = [(t, int(sched.index[t, s]), int(sched.kind[t, s])) for s in range(sched.steps) if sched.kind[t, s]]
            expect += real or [(t, int(sched.index[t, 0]), SKIP)]
        assert list(zip(visits.rows.tolist(), visits.cols.tolist(), visits.kind.tolist())) == expect
        starts = np.flatnonzero(np.diff(visits.rows, prepend=-1))
        ends = np.flatnonzero(np.diff(visits.rows, append=tiles))
        np.testing.assert_array_equal(np.flatnonzero(visits.first), starts)
        np.testing.assert_array_equal(np.flatnonzero(visits.last), ends)
        assert sorted(set(visits.rows.tolist())) == list(range(tiles))
        assert all(a.dtype == np.int32 for a in visits.prefetch())
    empty = forward_schedule(SummaryMask(16, 4), 96, 16, 8, 32).visits()  # the first block sees no summary key
    assert empty.kind[0] == SKIP and empty.first[0] == empty.last[0] == 1


def test_packed_residues_visit_only_their_own_tile():
    # T=2048, S=256: 8 rows per residue; a 64-row tile packs 8 residues and needs only its own block
    sched = forward_schedule(DiagonalMask(8, 1), 2048, 64, 64)
    assert sched.steps == 1
    np.testing.assert_array_equal(sched.index[:, 0], np.arange(32))


def test_merge_partials_equals_softmax_over_the_union():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 12))
    values = rng.normal(size=(12, 3))
    in_first = rng.random((5, 12)) < 0.5
    in_first[:, 0] = True
    in_first[4, :] = True  # row 4: the second pass sees no key (l2 = -inf)

    def partial(sel):
        s = np.where(sel, scores, -np.inf)
        lse = np.logaddexp.reduce(s, axis=-1)
        p = np.where(sel, np.exp(s - np.where(np.isfinite(lse), lse, 0)[:, None]), 0.0)
        return p @ values, lse

    o1, l1 = partial(in_first)
    o2, l2 = partial(~in_first)
    assert np.isneginf(l2[4])
    o, l = merge_partials(o1, l1, o2, l2)
    o_ref, l_ref = partial(np.ones_like(in_first))
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(l, l_ref, rtol=1e-12)
    assert np.isfinite(o).all()


def test_default_tiles_follow_the_window_and_residue_length():
    from kernels.pallas_tpu import default_block_for, residue_pass_block
    assert default_block_for(patterns.dense(), 4096) == 512
    assert default_block_for(patterns.local_strided(256, 256), 4096) == 256
    assert default_block_for(patterns.local(64), 4096) == 128  # not below the MXU width
    assert default_block_for(patterns.local(300), 768) == 256  # the largest power of two dividing T
    assert residue_pass_block(512, 2048, 256) == 128   # 8 rows per residue: shrink to the floor
    assert residue_pass_block(512, 32768, 64) == 512   # 512 rows per residue: keep
    assert residue_pass_block(512, 32768, 128) == 256
