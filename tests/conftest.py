"""Shared fixtures (helpers live in zenft_testing.py, importable from every test directory)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from zenft_testing import tiny_model

# Lightning turns propagation off for its loggers when the root logger has no handler at its import, which depends on
# when the pytest version in use installs its own: turned back on, caplog sees the library's info lines either way.
for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).propagate = True


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test starts from the same environment variables: ``seed_everything`` (the ``zenft`` command runs it) sets
    ``PL_GLOBAL_SEED``, which later Trainers and the processes a test launches would inherit and reseed from."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def saved_base(tmp_path):
    """Save a tiny model with `save_pretrained` and return (arch -> directory) factory, so real loading is used."""

    def make(arch: str = "llama", seed: int = 0):
        path = tmp_path / f"base-{arch}-{seed}"
        if not path.exists():
            tiny_model(arch, seed).save_pretrained(path)
        return path

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
