import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from kit.caches import make_synthetic_cache  # noqa: E402


@pytest.fixture
def synthetic_cache(tmp_path):
    return make_synthetic_cache(tmp_path / "synthetic.h5")
