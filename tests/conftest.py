import pytest

from megrez import kernels
from megrez.tiny import create_tiny


@pytest.fixture(scope="module")
def lib():
    """The compiled CPU kernels (a test module may override this with stricter needs)."""
    lib = kernels.load()
    if lib is None:
        pytest.skip(f"CPU kernels unavailable here: {kernels.reason}")
    return lib


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    return create_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-moe", arch="moe", seed=0)


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory):
    return create_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-dense", arch="dense", seed=0)


@pytest.fixture(scope="session")
def tiny_omni(tmp_path_factory):
    return create_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-omni", arch="omni", seed=0)
