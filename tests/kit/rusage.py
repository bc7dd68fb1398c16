"""A pytest plugin for measuring the suite's CPU time, also under pytest-xdist (whose
workers' time the controller's rusage does not count):

    QAMRO_RUSAGE=/tmp/cpu.txt pytest -p kit.rusage -n auto ...

Each process (controller and workers) appends `pid user sys children_user children_sys`
(seconds) at its end. The controller's line (written last) is the suite's CPU time: its own,
plus its children's, which are the workers it reaped and, through them, their children
(qamro-pipe, torchrun, pip)."""
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
