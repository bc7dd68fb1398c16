"""A pytest plugin for measuring the suite's CPU time, also under pytest-xdist (whose
workers' time the controller's rusage does not count):

    QAMRO_RUSAGE=/tmp/cpu.txt pytest -p kit.rusage -n auto ...

Each process (controller and workers) appends `pid user sys children_user children_sys`
(seconds) at its end; the sum of the columns is the suite's CPU time."""
import os
import resource


def pytest_unconfigure(config):
    path = os.environ.get("QAMRO_RUSAGE")
    if path:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {me.ru_utime:.2f} {me.ru_stime:.2f} "
                    f"{kids.ru_utime:.2f} {kids.ru_stime:.2f}\n")
