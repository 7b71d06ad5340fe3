import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(2)


@pytest.fixture
def digits():
    from fsl.data import load_dataset

    return load_dataset("digits")


@pytest.fixture
def flower_task():
    """Flower stamps messages with the identity of the task running in the process (set by its
    engines); a ClientApp called directly runs as task 1."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
