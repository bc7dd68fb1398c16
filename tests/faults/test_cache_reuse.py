"""Issue 12: a cache never serves stale contents, and --force replaces only what qamro-pipe
made. Real `qamro-pipe` processes meet changed labels, splits and system MOS, changed audio
behind unchanged names, a kill while a changed dataset's cache is rebuilt, a start killed
before its first clip, and --force aimed at things qamro-pipe did not write."""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import h5py
import numpy as np

from qamro_pipe.config import ExtractConfig
from qamro_pipe.extract.datasets import load_dataset
from qamro_pipe.extract.loop import extract, part_path
from qamro_pipe.store.reader import read_cache

from kit.children import N_CLIPS, assert_same_file, child_env, done_rows, extract_args, leftovers

TRAIN_LIST = "sets/train_mos_list.txt"
DEV_LIST = "sets/dev_mos_list.txt"
SYSTEM_MOS = "system_mos/system_mos_phase1.csv"


def _ids(path: Path) -> list[str]:
    with h5py.File(path, "r", locking=False) as f:
        return f["ids"].asstr()[()].tolist()


def _relabel(root: Path) -> None:
    """A score fixed in the train list, a clip moved to the dev list, a system's MOS redone:
    the kinds of edit a dataset's lists get after a first extraction."""
    lines = (root / TRAIN_LIST).read_text().splitlines()
    name, _, textual = lines[1].split(",")
    lines[1] = f"{name},1.4,{textual}"
    moved = lines.pop(2)
    (root / TRAIN_LIST).write_text("\n".join(lines) + "\n")
    with open(root / DEV_LIST, "a") as f:
        f.write(moved + "\n")
    mos = (root / SYSTEM_MOS).read_text().splitlines()
    mos[0] = mos[0].split(",")[0] + ",4.1000,4.2000"
    (root / SYSTEM_MOS).write_text("\n".join(mos) + "\n")


def _swap_audio(root: Path, names: list[str]) -> None:
    """Replace each file by another clip's audio under its own name (same size, new mtime)."""
    wavs = sorted((root / "wav").iterdir())
    for name in names:
        donor = next(w for w in reversed(wavs) if w.name not in names)
        shutil.copyfile(donor, root / "wav" / name)


def _fresh(tally, root: Path, out: Path) -> Path:
    c = tally.invoke(extract_args(root, out))
    assert c.proc.returncode == 0, c.stderr
    return out


def test_stale_labels_splits_and_system_mos_are_rewritten_not_served(corpus, tmp_path, tally):
    tally.fault = "stale labels, split and system MOS after a finished extract (and --force)"
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    out = _fresh(tally, root, tmp_path / "c.h5")
    _relabel(root)
    c = tally.invoke(extract_args(root, out), WRITE=0)
    assert c.proc.returncode == 0, c.stderr
    assert c.rows_written() == [], "a metadata change re-embedded clips"
    assert (f"{out}: nothing to embed ({N_CLIPS} clips); kept {N_CLIPS} clips of the earlier "
            f"cache; metadata rewritten without re-embedding: splits of 1 clip, labels of 1 "
            f"clip, system mos") == c.stdout, c.stdout
    fresh = _fresh(tally, root, tmp_path / "fresh.h5")
    assert_same_file(out, fresh)
    c = tally.invoke([*extract_args(root, out), "--force"], WRITE=0)
    assert c.proc.returncode == 0, c.stderr
    assert sorted(c.rows_written()) == list(range(N_CLIPS))  # --force rebuilds everything
    assert_same_file(out, fresh)


def test_changed_audio_behind_unchanged_names_is_re_embedded(corpus, tmp_path, tally):
    tally.fault = "audio changed behind unchanged file names (replaced file; same lists in " \
                  "another folder)"
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    out = tmp_path / "c.h5"
    _fresh(tally, root, out)
    ids = _ids(out)
    victim = ids[7] + ".wav"
    _swap_audio(root, [victim])
    c = tally.invoke(extract_args(root, out), WRITE=0)
    assert c.proc.returncode == 0, c.stderr
    assert c.rows_written() == [7], c.stderr
    assert "1 re-embedded (audio changed)" in c.stdout
    assert_same_file(out, _fresh(tally, root, tmp_path / "fresh.h5"))
    # the same lists in another folder, two of whose files hold other audio
    other = tmp_path / "copy"
    shutil.copytree(corpus, other)
    _swap_audio(other, [ids[3] + ".wav", ids[20] + ".wav"])
    c = tally.invoke(extract_args(other, out), WRITE=0)
    assert c.proc.returncode == 0, c.stderr
    assert sorted(c.rows_written()) == list(range(N_CLIPS))  # other paths: nothing reused
    assert_same_file(out, _fresh(tally, other, tmp_path / "fresh-copy.h5"))


def test_sigkill_while_a_changed_dataset_is_migrated_resumes_to_the_same_cache(
        corpus, tmp_path, tally):
    tally.fault = "SIGKILL while a changed dataset's cache is rebuilt (copying kept rows, " \
                  "before the rename, re-embedding)"
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    out = tmp_path / "c.h5"
    args = extract_args(root, out)
    _fresh(tally, root, out)
    ids = _ids(out)
    _relabel(root)
    _swap_audio(root, [ids[5] + ".wav"])  # kept rows then come in runs: 0-4, 6-...
    before = out.read_bytes()

    def killed_at(env, line):
        c = tally.child(args, env)
        assert c.wait_line(line) is not None, c.stderr
        assert c.kill() == -signal.SIGKILL
        read_cache(out, require_complete=False)  # readable after every kill
        return c

    c = killed_at(child_env(MIGRATE=30), "qamro-fault: migrate")
    assert out.read_bytes() == before, "the old cache changed before the new one was whole"
    assert leftovers(tmp_path) == [f".c.h5.tmp-{c.pid}"]
    c = killed_at(child_env(CREATE=30), "qamro-fault: create")
    assert out.read_bytes() == before and leftovers(tmp_path) == [f".c.h5.tmp-{c.pid}"]
    c = killed_at(child_env(WRITE=30), "qamro-fault: write")  # the new cache is in place
    assert leftovers(tmp_path) == []
    new = read_cache(out, require_complete=False)
    kept = done_rows(out)
    assert len(kept) == N_CLIPS - 1 and ids[5] not in new.ids[sorted(kept)]
    c = tally.invoke(args, WRITE=0)
    assert c.proc.returncode == 0, c.stderr
    assert c.rows_written() == [new.ids.tolist().index(ids[5])]
    assert f"{N_CLIPS - 1} were already done" in c.stdout
    assert_same_file(out, _fresh(tally, root, tmp_path / "fresh.h5"))
    assert leftovers(tmp_path) == []


def test_a_start_killed_before_its_first_clip_pins_nothing(corpus, reference, tmp_path,
                                                           tally):
    tally.fault = "start killed before its first clip, rerun with other settings"
    out = tmp_path / "c.h5"
    c = tally.child(extract_args(corpus, out, "--precision", "bf16"), child_env(WRITE=30))
    c.wait_line("qamro-fault: write")
    c.kill()
    assert out.exists() and done_rows(out) == set()  # an empty cache, made as bf16
    c = tally.invoke(extract_args(corpus, out))  # before: "made under a different configuration"
    assert c.proc.returncode == 0, c.stderr
    assert "replaced a cache that held no clip yet" in c.stdout
    assert_same_file(out, reference)


def _tree(path: Path) -> list:
    if path.is_file():
        return [(path.name, path.read_bytes())]
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None)
                  for p in path.rglob("*"))


def test_force_on_what_qamro_pipe_did_not_make_is_refused(corpus, tmp_path, tally):
    tally.fault = "--force on a folder, a text file, a foreign HDF5 file (extract, cache merge)"
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub" / "data.csv").write_text("a,b\n")
    text = tmp_path / "notes.h5"
    text.write_text("not a cache")
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    parts = []
    recs = load_dataset("musiceval", corpus)
    cfg = ExtractConfig(backbone="melstats", device="cpu", workers=0, batch_size=2)
    for k in range(2):  # real shards, so only the refusal stops the merge
        extract(recs, cfg, tmp_path / "p" / "c.h5", progress=False, shard=(k, 2))
        parts.append(part_path(tmp_path / "p" / "c.h5", k, 2))
    cases = {(folder, "a folder"), (text, "a file that is not HDF5"),
             (foreign, "an HDF5 file that is not a qamro-pipe cache")}
    ran = []  # in this process (kit.cli): nothing here is killed, so no child is needed
    for path, what in sorted(cases, key=str):
        before = _tree(path)
        for args in ([*extract_args(corpus, path), "--force"],
                     ["cache", "merge", *parts, "--out", path, "--force"]):
            ran.append((path, what, before, args, tally.invoke(args)))
    for path, what, before, args, c in ran:
        assert c.finish() == 1, (args, c.stderr)
        [line] = c.stderr.strip().splitlines()
        assert line == (f"error: {path}: {what}, not a cache qamro-pipe wrote, so it is left "
                        f"alone (--force replaces only qamro-pipe caches): choose another "
                        f"--out or move it away"), line
        assert "Traceback" not in c.stderr and c.stdout == ""
        assert _tree(path) == before, path
    assert not list(tmp_path.glob("*.lock"))  # refused before anything was written
