"""Fixtures of the fault-injection suite. Every test records `fault` (what was done), `runs`
(child processes started) and `invoked` (commands run in-process) with record_property; tests/faults/report.py turns them into
the reliability table. (tests/faults is a package, so this conftest does not shadow
tests/conftest.py; the child-process helpers are kit.children, tests/kit/children.py.)"""
from __future__ import annotations

from pathlib import Path

import pytest

from kit.children import CORPUS, Child, extract_args, run
from kit.cli import Ran, invoke


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from qamro_pipe.extract.datasets.demo import write_demo_corpus

    return write_demo_corpus(tmp_path_factory.mktemp("faults") / "corpus", **CORPUS)


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory) -> Path:
    """The cache of one uninterrupted run, through the console script."""
    out = tmp_path_factory.mktemp("reference") / "melstats.h5"
    c = run(extract_args(corpus, out))
    assert c.proc.returncode == 0, c.stderr
    return out


@pytest.fixture
def tally(record_property):
    """Count child runs and name the fault for the report."""
    class Tally:
        runs = 0  # child processes started, or in-process attempts where in_process is set
        fault = ""
        in_process = False
        invoked = 0  # commands run in-process (kit.cli): what a child would say, in less time

        def child(self, *a, **k) -> Child:
            self.runs += 1
            return Child(*a, **k)

        def run(self, *a, **k) -> Child:
            self.runs += 1
            return run(*a, **k)

        def invoke(self, args, **faults: float) -> Ran:
            """The command in this process, where the process is not the point; one
            thread, as child_env gives a child, so its numbers equal a child's."""
            self.invoked += 1
            return invoke(*args, threads=1, **faults)

    t = Tally()
    yield t
    record_property("fault", t.fault)
    record_property("runs", t.runs)
    record_property("in_process", t.in_process)
    record_property("invoked", t.invoked)
