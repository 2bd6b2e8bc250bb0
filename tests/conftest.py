import os

import pytest
import torch

# Two cores: keep intra-op threads fixed so timings and results are stable. Subprocesses the tests start
# (CLI runs, torchrun ranks) get one thread each: several of them share the two cores, and oversubscribed
# OpenMP threads spin-wait on each other (10x slower on a busy machine).
torch.set_num_threads(int(os.environ.get("OPENK2_TEST_THREADS", "2")))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
