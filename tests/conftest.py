import os

import pytest
import torch

# Two cores: keep intra-op threads fixed so timings and results are stable.
torch.set_num_threads(int(os.environ.get("OPENK2_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
