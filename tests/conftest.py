import os

import pytest
import torch

# before any test module imports Lightning or torchmetrics, which import torchvision when it
# is installed: the engine makes a torchvision built for another torch importable first
import anchorlearn.engine  # noqa: F401

# Tests run on small tensors; one thread per process keeps the 2-core CI machine responsive
# and makes timings of parallel test processes comparable.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
