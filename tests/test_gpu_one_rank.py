"""GPU tier on one GPU: a communicator of one rank runs the layout, a high-throughput dispatch + combine and
low-latency dispatches + combines (decode shapes among them) against the NumPy oracle, bit for bit.

These tests need one GPU, unlike the rest of the multi-rank modules whose scenarios they reuse, so they live here: a
machine with a single GPU runs them too.
"""

import pytest
from conftest import requires_gpus
from test_gpu_ht import one_rank_ht
from test_gpu_layout import single_rank
from test_gpu_ll import one_rank_ll

import pydeepep

pytestmark = [pytest.mark.gpu, requires_gpus(1)]


def test_one_rank_communicator_works():
    assert pydeepep.spawn(single_rank, nprocs=1, timeout=120) == [(1, True)]


def test_ht_on_one_rank():
    assert pydeepep.spawn(one_rank_ht, nprocs=1, timeout=300) == [True]


def test_ll_on_one_rank():
    (result,) = pydeepep.spawn(one_rank_ll, nprocs=1, timeout=300)
    assert all(v is True for v in result.values()), result
