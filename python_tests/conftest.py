import os

# MKL may choose its code path from the data's alignment, so the same computation in two
# processes can differ in the last bit; its conditional bitwise reproducibility mode (read when
# MKL loads, hence before torch) lets tests compare runs exactly. Subprocesses inherit it.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
