import os

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd3_path():
    """The tiny offline SD3 pipeline, built once into trl-flow's cache (reused across runs)."""
    from trl_flow.offline_models.sd3 import ensure_tiny_sd3

    return ensure_tiny_sd3()
