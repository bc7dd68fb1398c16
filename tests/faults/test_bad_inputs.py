"""Issues 5.4 and 5.5: broken manifests and labels, and caches used the wrong way, each met
through the command line with one clear line naming the file (and line), exit code 1, no
traceback, and nothing on disk changed or lost."""
from __future__ import annotations

import shutil

import h5py
import torch

from kit.children import assert_same_file, child_env, extract_args

TRAIN_LIST = "sets/train_mos_list.txt"


def _edit_line(path, n, fn):
    lines = path.read_text().splitlines()
    lines[n - 1] = fn(lines[n - 1])
    path.write_text("\n".join(lines) + "\n")


def _musiceval(case, corpus, root):
    shutil.copytree(corpus, root)
    if case == "label outside the scale":
        _edit_line(root / TRAIN_LIST, 2, lambda l: l.rsplit(",", 2)[0] + ",7.0,4.0")
        return "train_mos_list.txt, line 2, column 'overall': 7 is outside the scale [1, 5]"
    if case == "NaN label (MusicEval list)":
        _edit_line(root / TRAIN_LIST, 3, lambda l: l.rsplit(",", 1)[0] + ",nan")
        return "train_mos_list.txt, line 3, column 'textual': 'nan' is not a number"
    if case == "list line with a wrong field count":
        _edit_line(root / TRAIN_LIST, 4, lambda l: l + ",5.0")
        return "train_mos_list.txt, line 4: expected 3 comma-separated field(s)"
    if case == "system twice in the system MOS file":
        with open(root / "system_mos/system_mos_phase1.csv", "a") as f:
            f.write("S001,3.0,3.0\n")  # (a system with no clip is ignored with a note)
        return "system_mos_phase1.csv, line 5: system 'S001' appears twice (first on line 1)"
    if case == "listed wav file missing":
        sorted((root / "wav").iterdir())[0].unlink()
        return "1 audio file(s) missing:"
    raise AssertionError(case)


def _manifest(case, corpus, root):
    root.mkdir()
    wavs = sorted((corpus / "wav").iterdir())
    rows = [f"a,{wavs[0]},S001,3.0", f"b,{wavs[1]},S001,4.0", f"c,{wavs[2]},S002,2.0"]
    if case == "manifest: missing audio path":
        rows[1] = f"b,{root / 'nowhere.wav'},S001,4.0"
        expect = f"1 audio file(s) missing: {root / 'nowhere.wav'} (clips.csv, line 3)"
    elif case == "manifest: duplicate id":
        rows[2] = "a" + rows[2][1:]
        expect = "clips.csv, line 4: duplicate id 'a' (first on line 2)"
    elif case == "manifest: NaN label":
        rows[0] = rows[0].rsplit(",", 1)[0] + ",NaN"
        expect = "clips.csv, line 2, column 'mos': 'NaN' is not a number; leave the cell empty"
    elif case == "manifest: wrong field count":
        rows[1] += ",extra"
        expect = "clips.csv, line 3: expected 4 fields (id,path,system,mos), found 5"
    else:
        raise AssertionError(case)
    (root / "clips.csv").write_text("id,path,system,mos\n" + "\n".join(rows) + "\n")
    return expect


CASES = ["label outside the scale", "NaN label (MusicEval list)",
         "list line with a wrong field count", "system twice in the system MOS file",
         "listed wav file missing", "manifest: missing audio path", "manifest: duplicate id",
         "manifest: NaN label", "manifest: wrong field count"]


def test_bad_manifests_and_labels_are_one_clear_line(corpus, tmp_path, tally):
    tally.fault = f"bad manifests and labels via `extract` ({len(CASES)} cases)"
    children = {}
    for i, case in enumerate(CASES):  # in-process: each is an error path of a few 100 ms
        root = tmp_path / f"case{i}"
        out = tmp_path / f"case{i}.h5"
        if case.startswith("manifest"):
            expect = _manifest(case, corpus, root)
            args = ["extract", "--manifest", root / "clips.csv", "--backbone", "melstats",
                    "--device", "cpu", "--quiet", "--out", out]
        else:
            expect = _musiceval(case, corpus, root)
            args = extract_args(root, out)
        children[case] = (tally.invoke(args), expect, out)
    for case, (c, expect, out) in children.items():
        assert c.finish() == 1, (case, c.stdout, c.stderr)
        assert "Traceback" not in c.stderr and c.stdout == "", case
        lines = c.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, lines)
        assert expect in lines[0], (case, lines[0])
        assert not out.exists(), case


def _misuse(kind, path):
    if kind == "schema version":
        with h5py.File(path, "r+", locking=False) as f:
            f.attrs["qamro_cache_version"] = 2
        return "cache schema version 2, this qamro-pipe reads version 1"
    if kind == "truncated file":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 3])
        return "not a readable HDF5 cache (truncated or another format)"
    if kind == "not HDF5":  # not ours: extract leaves it alone, even with --force (issue 12)
        path.write_text("id,path\n")
        return "not a readable HDF5 cache (truncated or another format)"
    raise AssertionError(kind)


MISUSE = {  # (backbone, options) on a cache made with melstats defaults -> the error
    "another backbone": ("aesthetics", ["--checkpoint", "random"],
                         "backbone: cache has 'melstats@1', this extract has 'aesthetics@2'"),
    "another checkpoint": ("aesthetics", ["--checkpoint", "CKPT"],
                           "weights: cache has 'none', this extract has 'sha256:"),
    "another precision": ("melstats", ["--precision", "bf16"],
                          "precision: cache has 'fp32', this extract has 'bf16'"),
}


FOREIGN = "a file that is not HDF5, not a cache qamro-pipe wrote, so it is left alone"


def test_cache_misuse_is_refused_and_leaves_the_file_alone(corpus, reference, tmp_path, tally):
    tally.fault = "cache misuse: other backbone/checkpoint/precision/schema, truncated, " \
                  "not HDF5 (extract and train)"
    ckpt = tmp_path / "weights.pt"  # weights are keyed by content: any readable file will do
    torch.save({"state_dict": {"w": torch.ones(3)}}, ckpt)
    children = []
    for i, (kind, (backbone, opts, expect)) in enumerate(MISUSE.items()):
        path = tmp_path / f"m{i}.h5"
        shutil.copy(reference, path)
        opts = [str(ckpt) if o == "CKPT" else o for o in opts]
        c = tally.invoke(extract_args(corpus, path, *opts, backbone=backbone))
        children.append((kind, "extract", c, expect, path, reference.read_bytes()))
    for j, kind in enumerate(("schema version", "truncated file", "not HDF5")):
        path = tmp_path / f"b{j}.h5"
        shutil.copy(reference, path)
        expect = _misuse(kind, path)
        before = path.read_bytes()
        children.append((kind, "extract", tally.invoke(extract_args(corpus, path)),
                         FOREIGN if kind == "not HDF5" else expect, path, before))
        run_out = tmp_path / f"r{j}"
        children.append((kind, run_out, tally.invoke(["train", "--recipe", "demo", "--cache",
                                                      path, "--out", run_out]),
                         expect, path, before))
    for kind, cmd, c, expect, path, before in children:
        assert c.finish() == 1, (kind, cmd, c.stderr)
        [line] = c.stderr.strip().splitlines()
        assert line.startswith(f"error: {path}: ") and expect in line, (kind, cmd, line)
        if cmd == "extract":
            assert line.endswith("; pass --force to replace it") or expect == FOREIGN, line
        else:
            assert not cmd.exists()  # no run folder from a refused cache
        assert path.read_bytes() == before, (kind, cmd)
    # --force replaces a broken cache (truncated: HDF5's signature and our attribute's name
    # survive at its start) with a whole new cache
    path = tmp_path / "b1.h5"
    c = tally.invoke([*extract_args(corpus, path), "--force"])
    assert c.proc.returncode == 0, c.stderr
    assert_same_file(path, reference)


def test_two_extracts_on_one_cache_one_writes_the_other_is_refused(corpus, reference,
                                                                   tmp_path, tally):
    tally.fault = "two extract processes on one cache at once (+ cache info, train meanwhile)"
    out = tmp_path / "c.h5"
    # the first writer, a process, holds the cache, every row written but not yet marked
    # complete; the others run in this process, while it holds it
    first = tally.child(extract_args(corpus, out), child_env(FINISH=60))
    first.wait_line("qamro-fault: finish")
    second = tally.invoke(extract_args(corpus, out))
    info = tally.invoke(["cache", "info", out])  # readers need no lock
    train = tally.invoke(["train", "--recipe", "demo", "--cache", out, "--out", tmp_path / "r"])
    assert second.finish() == 1
    assert second.stderr.strip() == (f"error: {out}: another process is writing this cache "
                                     f"(lock c.h5.lock is held); wait for it to finish")
    assert info.finish() == 0
    assert "INCOMPLETE (being extracted by another process now)" in info.stdout
    assert train.finish() == 1
    assert "another process is writing this cache now; wait for it" in train.stderr
    assert not (tmp_path / "r").exists()
    first.kill()  # the lock goes with the process: the next run just finishes
    c = tally.invoke(extract_args(corpus, out))
    assert c.proc.returncode == 0 and "24 were already done" in c.stdout, c.stderr
    assert_same_file(out, reference)
