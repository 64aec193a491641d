import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped cleanly without one)")
    # Keep test compiles out of the user's cache unless told otherwise.
    if "LINGHE_CACHE_DIR" not in os.environ:
        os.environ["LINGHE_CACHE_DIR"] = tempfile.mkdtemp(prefix="linghe-test-cache-")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
