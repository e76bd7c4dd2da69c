"""featlearn.pooling: the cells' geometry from the encoder's parameters (the bounds themselves
are checked in test_encoding.py and test_encodings_modern.py)."""

import pytest

from featlearn.pooling import as_pair, cell_bounds, map_shape, pool_window, pooling_bounds


def test_as_pair_names_the_parameter():
    assert as_pair(3, "pooling") == (3, 3)
    assert as_pair([2, 4], "pooling") == (2, 4)
    for bad in ([2, "a"], (1, 2, 3), (0, 2)):
        with pytest.raises(ValueError, match="pool_size must be a positive int"):
            as_pair(bad, "pool_size")


def test_map_shape_and_windows():
    assert map_shape((32, 32), 6, 1) == (27, 27)
    assert map_shape((13, 12), 3, 2) == (6, 5)
    assert pool_window(None, 3) is None
    assert pool_window(5, 3) == (5, 5, 3, 3)
    assert pool_window((5, 4), None) == (5, 4, 5, 4)


def test_cell_bounds_grid_or_windows():
    rows, cols = cell_bounds((27, 27), (2, 3))
    assert rows == pooling_bounds(27, 2) and cols == pooling_bounds(27, 3)
    rows, cols = cell_bounds((27, 10), 2, pool_window(5, 3))
    assert len(rows) == 9 and rows[-1] == (24, 27)
    assert cols == [(0, 5), (3, 8), (6, 10)]
