"""smallest_first: the stable sort's first n, found in linear time, whatever the ties."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tierflow.ordering import smallest_first

# Few distinct values, so rows are full of ties, including at the n-th smallest.
keys = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 30)).flatmap(
    lambda shape: arrays(np.float64, shape, elements=st.sampled_from([-1.0, 0.0, 0.5, 2.0, np.inf])))


@given(keys, st.integers(0, 32))
def test_smallest_first_is_the_stable_sorts_first_n(values, n):
    expected = np.argsort(values, axis=-1, kind="stable")[..., :n]
    got = smallest_first(values, n)
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_equal_keys_go_by_position_in_every_row():
    values = np.array([[3, 1, 1, 1, 0, 1], [2, 2, 2, 2, 2, 2]])
    assert smallest_first(values, 3).tolist() == [[4, 1, 2], [0, 1, 2]]
