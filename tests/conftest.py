import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(2)


@pytest.fixture
def digits():
    from fsl.data import load_dataset

    return load_dataset("digits")
