"""Run the fault-injection suite and print the reliability table:
fault | runs tried | nothing lost.

    .venv/bin/python tests/faults/report.py [extra pytest options]

"runs tried" counts the real `qamro-pipe` processes a test started (killed, interrupted or
fed bad input), "+ N in-process" the commands it ran in the test's own process (kit.cli: bad
input and reruns, where the process is not the point), or its attempts where it works
in-process; "nothing lost" is yes when every check of the test held:
no finished work lost, no wrong or non-finite number written, a clear error where one was due.
Exit status: pytest's."""
from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    del sys.path[0]  # run as a script: do not shadow tests/conftest.py with ours

import pytest  # noqa: E402


class Collector:
    def __init__(self):
        self.rows: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        row = self.rows.setdefault(report.nodeid, {"outcome": "passed", "props": {}})
        row["props"].update(dict(report.user_properties))
        if report.when == "call" and hasattr(report, "wasxfail"):
            row["outcome"] = "xfail"
            row["why"] = report.wasxfail
        elif report.failed:
            row["outcome"] = "failed"
        elif report.skipped and row["outcome"] == "passed":
            row["outcome"] = "skipped"


def table(rows: dict[str, dict]) -> str:
    lines = []
    for nodeid, row in rows.items():
        fault = row["props"].get("fault") or nodeid.split("::")[-1]
        runs = row["props"].get("runs", 0)
        lost = {"passed": "yes", "failed": "NO (test failed)", "skipped": "skipped",
                "xfail": "not yet (" + row.get("why", "") + ")"}[row["outcome"]]
        where = " (in-process)" if row["props"].get("in_process") else ""
        invoked = row["props"].get("invoked", 0)
        more = f" + {invoked} in-process" if invoked else ""
        lines.append((fault, f"{runs}{where}{more}", lost))
    w = [max(len(r[i]) for r in lines + [("fault", "runs tried", "nothing lost")])
         for i in range(2)]
    out = [f"{'fault':<{w[0]}}  {'runs tried':>{w[1]}}  nothing lost",
           f"{'-' * w[0]}  {'-' * w[1]}  {'-' * 12}"]
    out += [f"{f:<{w[0]}}  {r:>{w[1]}}  {lost}" for f, r, lost in lines]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    collector = Collector()
    t0 = time.perf_counter()
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(HERE), *argv], plugins=[collector])
    print()
    print(table(collector.rows))
    runs = sum(r["props"].get("runs", 0) for r in collector.rows.values()
               if not r["props"].get("in_process"))
    invoked = sum(r["props"].get("invoked", 0) for r in collector.rows.values())
    print(f"\n{len(collector.rows)} checks, {runs} qamro-pipe processes, {invoked} in-process, "
          f"{time.perf_counter() - t0:.0f} s")
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
