import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kit.backbones import (  # noqa: E402
    aesthetics_backbone,
    clap_backbone,
    muq_backbone,
    write_roberta_style_tokenizer,
)
from kit.caches import make_synthetic_cache  # noqa: E402
from kit.cli import invoke  # noqa: E402
from kit.release import publisher_checkpoint  # noqa: E402


@pytest.fixture
def synthetic_cache(tmp_path):
    return make_synthetic_cache(tmp_path / "synthetic.h5")


# the random-weight backbones, full size, built once a session (kit.backbones); a test that
# changes one works on a copy
@pytest.fixture(scope="session")
def clap(tmp_path_factory):
    return clap_backbone(write_roberta_style_tokenizer(tmp_path_factory.mktemp("tok")
                                                       / "roberta"))


@pytest.fixture(scope="session")
def aes():
    return aesthetics_backbone()


@pytest.fixture(scope="session")
def muq_bb():
    return muq_backbone()


# Audiobox-Aesthetics' checkpoint.pt as its publisher builds it (kit.release), once a session
# (415 MB, 2 s of CPU): the tests that take it read or copy it, never change it
@pytest.fixture(scope="session")
def publisher_ckpt(tmp_path_factory):
    return publisher_checkpoint(tmp_path_factory.mktemp("publisher") / "checkpoint.pt")


# Run order. The tests that take the session's full-size backbones or the publisher's
# checkpoint run first, whole modules together: pytest-xdist (make test: --dist worksteal)
# gives each worker a contiguous share of this order and an idle worker steals from the end
# of another's, so these land on one worker, which builds each backbone once; the other
# worker would otherwise build them all again for the modules it got (clap, aes and muq
# with publisher_ckpt: about 14 s of CPU). Only the order of whole modules changes.
SHARED_HEAVY = {"clap", "aes", "muq_bb", "one_build", "publisher_ckpt"}


def pytest_collection_modifyitems(items):
    first = {item.module for item in items
             if getattr(item, "module", None) and SHARED_HEAVY & set(item.fixturenames)}
    items.sort(key=lambda item: getattr(item, "module", None) not in first)  # stable


def _process_state() -> dict:
    """What one test (an in-process CLI run above all) could leave changed for the next."""
    return {"cwd": os.getcwd(),
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith(("QAMRO_", "TRITON_")) or k.endswith("_OFFLINE")
                    or k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")},
            "torch threads": torch.get_num_threads(),
            "matmul precision": torch.get_float32_matmul_precision(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "grad enabled": torch.is_grad_enabled(),
            "default dtype": torch.get_default_dtype(),
            "SIGINT handler": signal.getsignal(signal.SIGINT)}


@pytest.fixture(autouse=True)
def no_state_leaks():
    """Every test leaves the process as it found it: tests share one process (and the CLI
    runs in it), so a changed working directory, variable, thread count or torch setting
    would change the tests after it."""
    before = _process_state()
    yield
    after = _process_state()
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}


@pytest.fixture
def cli():
    """`cli("train", "--cache", path, ...)`: qamro-pipe in this process (kit.cli.invoke)."""
    return invoke
