"""BatchIterator: a pure function of (seed, step), covering each index once per epoch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visionmoe.data import BatchIterator


def test_same_step_same_indices_across_instances():
    a, b = BatchIterator(103, 8, seed=5), BatchIterator(103, 8, seed=5)
    for step in (0, 1, 12, 13, 40, 7, 0):  # out of order on purpose: no hidden state
        np.testing.assert_array_equal(a.indices_for_step(step), b.indices_for_step(step))
    assert not np.array_equal(a.indices_for_step(0), BatchIterator(103, 8, 6).indices_for_step(0))


def test_matches_documented_permutation_formula():
    it = BatchIterator(50, 7, seed=3)
    assert it.steps_per_epoch == 7 and len(it) == 7
    step = 2 * 7 + 4
    perm = np.random.default_rng((3, 2)).permutation(50)
    np.testing.assert_array_equal(it.indices_for_step(step), perm[28:35])
    assert it.epoch_of(step) == 2


def test_epochs_differ_and_no_shuffle_is_sequential():
    it = BatchIterator(40, 10, seed=0)
    assert not np.array_equal(it.indices_for_step(0), it.indices_for_step(4))
    seq = BatchIterator(10, 4, seed=0, shuffle=False, drop_last=False)
    assert [seq.indices_for_step(s).tolist() for s in range(4)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
        [0, 1, 2, 3],
    ]


def test_resume_reproduces_the_uninterrupted_run():
    it = BatchIterator(30, 4, seed=9)
    full = list(it.batches(num_steps=20))
    resumed = list(BatchIterator(30, 4, seed=9).batches(start_step=13, num_steps=7))
    for x, y in zip(full[13:], resumed, strict=True):
        np.testing.assert_array_equal(x, y)


def test_returned_indices_are_independent_copies():
    it = BatchIterator(10, 5, seed=0)
    first = it.indices_for_step(0)
    first[:] = -1
    assert (it.indices_for_step(0) >= 0).all()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    batch=st.integers(1, 16),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 5),
    drop_last=st.booleans(),
)
def test_epoch_covers_each_index_once(n: int, batch: int, seed: int, epoch: int, drop_last: bool):
    if drop_last and batch > n:
        with pytest.raises(ValueError):
            BatchIterator(n, batch, seed, drop_last=True)
        return
    it = BatchIterator(n, batch, seed, drop_last=drop_last)
    start = epoch * it.steps_per_epoch
    parts = [it.indices_for_step(start + s) for s in range(it.steps_per_epoch)]
    seen = np.concatenate(parts)
    assert len(np.unique(seen)) == len(seen)  # no index repeats within an epoch
    if drop_last:
        assert all(len(p) == batch for p in parts) and len(seen) == (n // batch) * batch
    else:
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    assert seen.dtype == np.int64


@pytest.mark.parametrize("args", [(0, 1, 0), (5, 0, 0), (5, 2, -1), (3, 4, 0)])
def test_invalid_arguments(args: tuple[int, int, int]):
    with pytest.raises(ValueError):
        BatchIterator(*args)
    with pytest.raises(ValueError):
        BatchIterator(5, 2, 0).indices_for_step(-1)
