"""Session fixture: the synthetic data root (every on-disk format), generated once.

Use it from a test module with `from conftest_data import synthetic_root  # noqa: F401`.
"""
import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic_data")
    generate(str(root), seed=0, num_images=12)
    return str(root)
