"""Issue 12.1: `--force` replaces only a run folder the tool wrote. Each reproduction of the
new-user trial (exit 0 and data deleted, or a traceback) is now one line, exit 1, before any
training, with everything that was there left as it was. In-process (kit.cli): what is
checked is the message, the exit code and the files, not a process."""
from __future__ import annotations

from pathlib import Path

import pytest

from kit.caches import make_synthetic_cache

FAST = ["--max-epochs", "3", "--quiet"]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def cache(tmp_path):
    return make_synthetic_cache(tmp_path / "synthetic.h5")


def refused(c, *words) -> None:
    assert c.proc.returncode == 1, (c.stdout, c.stderr)
    assert "Traceback" not in c.stderr and len(c.stderr.strip().splitlines()) == 1, c.stderr
    for w in words:
        assert w in c.stderr, c.stderr


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_force_leaves_a_folder_the_tool_did_not_make(tmp_path, cache, tally, command):
    tally.fault = f"{command} --out <a user's folder> --force"
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes\n")
    (mine / "sub" / "data.csv").write_text("1,2\n")
    before = tree(mine)
    extra = ["--beta", "1,7"] if command == "sweep" else []
    c = tally.invoke([command, "--cache", cache, "--out", mine, "--force", *extra, *FAST])
    refused(c, str(mine), "did not write", "refusing to replace it")
    assert tree(mine) == before


def test_force_never_replaces_the_input_cache_a_file_or_the_working_directory(
        tmp_path, cache, tally, monkeypatch):
    tally.fault = "train --out <the cache | a file | . > --force"
    cache_bytes = cache.read_bytes()
    c = tally.invoke(["train", "--cache", cache, "--out", cache, "--force", *FAST])
    refused(c, "the cache this run trains from")
    assert cache.read_bytes() == cache_bytes

    note = tmp_path / "results.txt"
    note.write_text("keep me\n")
    c = tally.invoke(["train", "--cache", cache, "--out", note, "--force", *FAST])
    refused(c, "a file is there")
    assert note.read_text() == "keep me\n"

    work = tmp_path / "work"
    work.mkdir()
    (work / "paper.tex").write_text("\\begin{document}\n")
    before = tree(work)
    monkeypatch.chdir(work)
    c = tally.invoke(["train", "--cache", cache, "--out", ".", "--force", *FAST])
    refused(c, "working directory")
    assert tree(work) == before


def test_force_replaces_a_run_folder_and_an_empty_folder_is_used(tmp_path, cache, tally):
    tally.fault = "train --out <its own run folder | an empty folder> (--force)"
    out = tmp_path / "run"
    assert tally.invoke(["train", "--cache", cache, "--out", out, *FAST]).proc.returncode == 0
    c = tally.invoke(["train", "--cache", cache, "--out", out, *FAST])
    refused(c, "run folder exists", "--force")
    c = tally.invoke(["train", "--cache", cache, "--out", out, "--force", "--seeds", "2", *FAST])
    assert c.proc.returncode == 0, c.stderr
    assert "m1" in (out / "predictions.csv").read_text().splitlines()[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    c = tally.invoke(["train", "--cache", cache, "--out", empty, *FAST])
    assert c.proc.returncode == 0, c.stderr
    assert (empty / "config.json").is_file()
