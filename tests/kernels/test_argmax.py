"""argmax_rows against torch.argmax: the same index, ties, NaN and -inf rows included."""

from __future__ import annotations

import pytest
import torch

from kestrel.kernels.argmax import argmax_rows

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _check(x: torch.Tensor, chunk: int) -> None:
    want = torch.argmax(x.cpu().float(), dim=-1)  # the CPU's answer is the reference
    got = argmax_rows(x, chunk=chunk)
    assert got.dtype == torch.int64 and got.device == x.device
    assert got.cpu().tolist() == want.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,chunk", [((1, 1000), 64), ((5, 777), 128), ((3, 4096), 4096),
                                         ((2, 50), 16)])
def test_random_rows(shape, chunk, dtype):
    x = torch.randn(*shape, device=DEV).to(dtype)
    _check(x, chunk)


def test_ties_take_the_first_index_across_and_within_chunks():
    x = torch.zeros(4, 300, device=DEV)
    x[0, [7, 9, 250]] = 3.0  # within one chunk and a later one
    x[1, [200, 130]] = 5.0  # the later chunk's copy comes first in the list, not in the row
    x[2] = float("-inf")  # every column -inf: index 0, as torch
    x[3, -1] = 1.0  # the last column, in a partial chunk
    _check(x, 64)


def test_nan_wins_and_the_first_nan_is_taken():
    x = torch.randn(3, 500, device=DEV)
    x[0, 123] = float("nan")
    x[0, 400] = float("nan")
    x[1, 10] = float("inf")
    x[1, 300] = float("nan")  # a NaN beats an earlier +inf
    x[2, 499] = float("nan")
    _check(x, 64)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="float"):
        argmax_rows(torch.zeros(2, 3, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="length 0"):
        argmax_rows(torch.zeros(2, 0, device=DEV))
    assert argmax_rows(torch.zeros(0, 5, device=DEV)).shape == (0,)
