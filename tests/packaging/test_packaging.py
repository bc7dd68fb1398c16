"""Issue 12.8: a wheel install finds its recipes. `pip install .` (not editable) used to
install no recipes, so train, sweep, demo and table failed with "no recipe 'musiceval'"."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_every_recipe(tmp_path):
    """Build the wheel as pip does for `pip install .` and look inside it."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("qamro_pipe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"qamro_pipe/stages/{p.name}" for p in (ROOT / "stages").glob("*.toml")}
    assert {"qamro_pipe/stages/musiceval.toml", "qamro_pipe/stages/demo.toml"} <= shipped
    assert shipped <= names, sorted(shipped - names)
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "qamro_pipe").rglob("*.py")}
    assert modules <= names, sorted(modules - names)  # a folder without __init__.py is left out


def test_recipes_are_found_from_the_package_not_the_working_directory(tmp_path, monkeypatch):
    from qamro_pipe.train.recipes import load_recipe

    monkeypatch.chdir(tmp_path)  # no stages/ here: the shipped ones are found
    assert load_recipe("musiceval").path.parent.name == "stages"
    assert load_recipe("musiceval").path.is_relative_to(ROOT / "stages")
