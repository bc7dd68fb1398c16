"""The one thing pyproject.toml cannot say: the top-level stages/ folder (the recipes a user
reads, copies and edits) is shipped inside the wheel as qamro_pipe/stages, a mapping rather
than a second copy. Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["qamro_pipe*"]), "qamro_pipe.stages"],
      package_dir={"qamro_pipe.stages": "stages"})
