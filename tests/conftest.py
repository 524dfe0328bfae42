import os
import shutil

# Triton kernels run under its interpreter where there is no GPU; triton reads this when it is first
# imported (torch and transformers may import it), so it is set before anything else.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import save_tiny_mixtral


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A baby Mixtral (4 experts, top-2, GQA) in the original per-expert key layout, 2 shards."""
    return save_tiny_mixtral(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def service(tiny_dir, tmp_path_factory):
    """An EngineService over the baby Mixtral, started once per test module."""
    from moe_runtime import OffloadConfig
    from webapp.service import EngineService

    service = EngineService(str(tiny_dir), OffloadConfig(device="cpu", store_dir=str(tmp_path_factory.mktemp("s"))))
    service.start()
    yield service
    service.close()
