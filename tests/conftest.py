"""Test setup: Triton runs in its CPU interpreter when there is no GPU; `gpu` tests skip then."""

import os

import pytest
import torch

# Must happen before any Triton kernel is defined (i.e. before sagan_fast.ops.triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_tf32_and_fixed_seed():
    """References run with TF32 off; every test starts from the same seed."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny models on a shared CPU run several times faster on one intra-op thread (modules that train
    them ask for it: ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
