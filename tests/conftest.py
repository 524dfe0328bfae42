import pytest
import torch

from tiny_models import save_tiny_mixtral


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A baby Mixtral (4 experts, top-2, GQA) in the original per-expert key layout, 2 shards."""
    return save_tiny_mixtral(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
