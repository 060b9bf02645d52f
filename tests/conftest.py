import os

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`-n 2` in pyproject.toml), each worker gets one of the machine's cores: two workers with a
# thread per core each would oversubscribe the CPU and both run slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")


def pytest_collection_modifyitems(config, items):
    """With ``--dist loadgroup``, a file's tests stay on one worker, one after another, so a module fixture (a
    2-process run, say) is built once. Launched process groups rendezvous on a free port each
    (`tests.factories.free_port`), so files that launch processes may run beside each other."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def tiny_sd3_path():
    """The tiny offline SD3 pipeline, built once into trl-flow's cache (reused across runs)."""
    from trl_flow.offline_models.sd3 import ensure_tiny_sd3

    return ensure_tiny_sd3()
