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

#: Test files that start processes of their own (`accelerate launch`, DeepSpeed): run one at a time, on one worker,
#: so that their process groups never share the default rendezvous port.
_LAUNCHING_TESTS = ("tests/distributed/",)


def pytest_collection_modifyitems(config, items):
    """With ``--dist loadgroup``, a file's tests stay on one worker (module fixtures such as a 2-process run are
    built once), and the files that launch processes share one group."""
    for item in items:
        path = item.nodeid.split("::")[0]
        group = "launching" if path.startswith(_LAUNCHING_TESTS) else path
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def tiny_sd3_path():
    """The tiny offline SD3 pipeline, built once into trl-flow's cache (reused across runs)."""
    from trl_flow.offline_models.sd3 import ensure_tiny_sd3

    return ensure_tiny_sd3()
