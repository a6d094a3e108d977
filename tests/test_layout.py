"""Jacobian layouts at a jaxpr's boundary (`fwdlap._core.layout`), in both modes."""

import jax.numpy as jnp
import numpy as np

from fwdlap._core import layout, sparse
from fwdlap._core.layout import DENSE, ZERO, Blocks, Mode, Tangents
from fwdlap._core.zeros import is_zero, zero_jacobian

CTX = sparse.SparseSpec(block_size=2, threshold=4).resolve(8)  # 4 blocks, 2 at most


def blocks(*rows: list[int]) -> Blocks:
    return Blocks(np.asarray(rows, np.int32))


def test_join_in_the_dense_mode_is_or() -> None:
    mode = Mode(8)
    assert mode.join(ZERO, ZERO) is ZERO
    assert mode.join(ZERO, DENSE) is DENSE
    assert mode.join(DENSE, ZERO) is DENSE
    assert mode.max_blocks == 0


def test_join_takes_the_union_of_blocks_up_to_the_threshold() -> None:
    mode = Mode.block_sparse(CTX)
    assert mode.join(ZERO, blocks([0, 1])) == blocks([0, 1])
    assert mode.join(blocks([0, 1]), blocks([0, 1])) == blocks([0, 1])
    # Per element: {0} | {1} and {1} | {1}; the second element's spare slot is empty.
    assert mode.join(blocks([0, 1]), blocks([1, 1])) == blocks([0, 1], [1, -1])
    assert mode.join(blocks([0, 1]), blocks([1, 0])) == blocks([0, 1], [1, 0])
    assert mode.join(blocks([0], [1]), blocks([2])) is DENSE  # 3 blocks > 2
    assert mode.join(blocks([0]), DENSE) is DENSE


def test_layouts_compare_by_value() -> None:
    assert blocks([0, 1]) == blocks([0, 1])
    assert blocks([0, 1]) != blocks([0, 2])
    assert blocks([0, 1]) != blocks([0, 1], [1, 0])
    assert blocks([0]) != DENSE and DENSE != blocks([0])
    assert Tangents([ZERO, blocks([3])], [True, False]) == Tangents(
        [ZERO, blocks([3])], [True, False]
    )


def test_data_round_trip_in_each_layout() -> None:
    mode = Mode.block_sparse(CTX)
    x = jnp.ones(2)
    sj = sparse.SparseJac(jnp.arange(4.0).reshape(2, 2), np.asarray([[1, 3]]), 2)
    wider = blocks([1, 3], [0, 0])
    data = mode.to_data(sj, x, wider)
    assert data.shape == (4, 2)
    back = mode.from_data(data, x, wider)
    np.testing.assert_array_equal(CTX.densify(back), CTX.densify(sj))
    dense = mode.to_data(sj, x, DENSE)
    assert dense.shape == (8, 2)
    assert mode.from_data(dense, x, DENSE) is dense
    zero = mode.to_data(zero_jacobian(x, 8), x, wider)
    assert zero.shape == (4, 2) and not np.any(zero)
    assert is_zero(mode.from_data(None, x, ZERO))


def test_the_dense_mode_keeps_dense_layouts() -> None:
    mode = Mode(6)
    x = jnp.ones((4, 3))
    jac = jnp.ones((6, 4, 3))
    assert layout.layout_of(jac) is DENSE
    assert mode.scanned_layout("scan", jac, x) is DENSE
    assert layout.stacked(DENSE, 5) is DENSE
    assert mode.to_data(jac, x, DENSE) is jac
    assert mode.data_aval(jnp.ones(3).aval, DENSE).shape == (6, 3)  # type: ignore
    assert mode.window_args() == []


def test_scanned_blocks_are_one_layout_for_every_slice() -> None:
    mode = Mode.block_sparse(CTX)
    x = jnp.ones((3, 2))
    idx = np.asarray([[[0, 0], [1, 1], [0, 0]]])  # slices depend on blocks 0, 1, 0
    sj = sparse.SparseJac(jnp.ones((2, 3, 2)), idx, 2)
    assert mode.scanned_layout("scan", sj, x) == blocks([0, 0], [1, 1])
    assert layout.stacked(blocks([0, 1]), 3) == Blocks(np.asarray([[[0, 1]] * 3]))
