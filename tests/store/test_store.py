import h5py
import numpy as np
import pytest

from qamro_pipe.errors import CacheError
from qamro_pipe.store import check_key, describe, read_cache, read_meta, write_cache
from qamro_pipe.store.files import writer_lock
from qamro_pipe.store.writer import CacheWriter, create_cache

from kit.caches import make_synthetic_cache


def test_roundtrip(synthetic_cache):
    c = read_cache(synthetic_cache)
    assert c.meta.version == 1 and c.meta.backbone == "synthetic@1"
    assert c.label_names == ("overall", "textual")
    assert c.features["audio"].shape == (240, 16) and c.labels.shape == (240, 2)
    assert len(c.system_mos) == 12 and c.usable.all()
    assert set(c.splits) == {"train", "dev"}
    with h5py.File(synthetic_cache) as f:
        assert f.attrs["created_by"].startswith("qamro-pipe")
    assert "features/audio float32 [240, 16]" in describe(synthetic_cache)


def test_windows_roundtrip(tmp_path):
    offsets = np.array([0, 2, 3, 6])
    w = np.random.default_rng(0).normal(size=(6, 3, 4)).astype(np.float32)
    p = write_cache(tmp_path / "w.h5", ids=["a", "b", "c"], systems=["s", "s", "t"],
                    splits=["train"] * 3, labels=np.ones((3, 1)), label_names=["q"],
                    features={"audio": np.zeros((3, 2), np.float32)}, backbone="x@1",
                    dataset="d", windows={"layers": w}, window_offsets=offsets,
                    window_weight=np.arange(6, dtype=np.float32))
    c = read_cache(p)
    assert np.array_equal(c.window_offsets, offsets)
    assert np.array_equal(c.windows["layers"], w)
    assert np.array_equal(c.window_weight, np.arange(6))


def test_refuses_missing_and_non_hdf5(tmp_path):
    with pytest.raises(CacheError, match="no such cache"):
        read_cache(tmp_path / "missing.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(CacheError, match="bad.h5.*not a readable HDF5"):
        read_cache(bad)


def test_refuses_truncated(synthetic_cache, tmp_path):
    data = synthetic_cache.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="cut.h5"):
        read_cache(cut)


def test_refuses_unknown_version_and_foreign_file(synthetic_cache, tmp_path):
    with h5py.File(synthetic_cache, "r+") as f:
        f.attrs["qamro_cache_version"] = 99
    with pytest.raises(CacheError, match="schema version 99"):
        read_cache(synthetic_cache)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="not a qamro-pipe cache"):
        read_cache(other)


def test_refuses_bad_shapes_and_nonfinite(tmp_path):
    p = make_synthetic_cache(tmp_path / "a.h5")
    with h5py.File(p, "r+") as f:
        del f["labels"]
        f["labels"] = np.zeros((240, 3), np.float32)
    with pytest.raises(CacheError, match="labels has shape"):
        read_cache(p)
    p = make_synthetic_cache(tmp_path / "b.h5")
    with h5py.File(p, "r+") as f:
        f["features/audio"][5, 3] = np.nan
    with pytest.raises(CacheError, match="features/audio has NaN or inf.*clip0005"):
        read_cache(p)


def test_incomplete_cache_is_refused_then_resumable(tmp_path):
    p = create_cache(tmp_path / "c.h5", ids=["a", "b", "c", "d"], systems=["s"] * 4,
                     splits=["train"] * 4, labels=np.ones((4, 1)), label_names=["q"],
                     backbone="x@1", dataset="d", config={"k": 1},
                     feature_shapes={"audio": (2,)})
    with CacheWriter(p) as w:
        w.write([2, 0], {"audio": np.array([[3, 3], [1, 1]], np.float32)})
        assert list(w.pending()) == [1, 3]
    with pytest.raises(CacheError, match="did not finish.*resume"):
        read_cache(p)
    with CacheWriter(p) as w:  # a new writer resumes from /done
        assert list(w.pending()) == [1, 3]
        w.write([1, 3], {"audio": np.array([[2, 2], [4, 4]], np.float32)})
        w.finish()
    c = read_cache(p)
    assert c.features["audio"][:, 0].tolist() == [1, 2, 3, 4]


def test_key_mismatch_is_refused(synthetic_cache):
    meta = read_meta(synthetic_cache)
    check_key(meta, {"made_by": "tests"})
    with pytest.raises(CacheError, match="different configuration.*made_by"):
        check_key(meta, {"made_by": "someone else"})


def test_second_writer_is_refused(tmp_path):
    p = tmp_path / "x.h5"
    with writer_lock(p):
        with pytest.raises(CacheError, match="another process is writing"):
            with writer_lock(p):
                pass
    with writer_lock(p):  # released
        pass


def test_duplicate_ids_refused(tmp_path):
    with pytest.raises(CacheError, match="not unique"):
        make_synthetic_cache(tmp_path / "d.h5", ids=["same"] * 240)


def _ratings(n=3, r=4, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 11, (n, r)).astype(np.float32)
    values[1, 2:] = np.nan  # clip 1 has two ratings
    return values


def test_ratings_roundtrip_and_info(tmp_path):
    """/ratings/<label> [N, R] NaN-padded and /rater_ids [N, R]: written, read, shown."""
    q = _ratings()
    ids = [["r1", "r2", "r3", "r4"], ["r2", "r5", "", ""], ["r1", "r2", "r3", "r4"]]
    p = write_cache(tmp_path / "r.h5", ids=["a", "b", "c"], systems=["s"] * 3,
                    splits=["train"] * 3, labels=np.nanmean(q, 1, keepdims=True),
                    label_names=["q"], features={"audio": np.zeros((3, 2), np.float32)},
                    backbone="x@1", dataset="d", ratings={"q": q}, rater_ids=ids)
    c = read_cache(p)
    assert list(c.ratings) == ["q"]
    np.testing.assert_array_equal(c.ratings["q"], q)  # NaN where equal too
    assert c.rater_ids.tolist() == ids
    assert "ratings    q: individual ratings for 3 clips, up to 4 each, from 5 raters" \
        in describe(p)
    # a cache without them (every cache before ratings existed) reads as before
    plain = make_synthetic_cache(tmp_path / "plain.h5")
    assert read_cache(plain).ratings == {} and read_cache(plain).rater_ids is None
    assert "\nratings " not in describe(plain)


def test_ratings_are_checked(tmp_path):
    common = dict(ids=["a", "b", "c"], systems=["s"] * 3, splits=["train"] * 3,
                  labels=np.ones((3, 1)), label_names=["q"],
                  features={"audio": np.zeros((3, 2), np.float32)}, backbone="x@1", dataset="d")
    with pytest.raises(CacheError, match="unknown labels"):
        write_cache(tmp_path / "a.h5", ratings={"other": _ratings()}, **common)
    with pytest.raises(CacheError, match="one R"):
        write_cache(tmp_path / "b.h5", ratings={"q": _ratings()}, rater_ids=[["x"]] * 3,
                    **common)
    inf = _ratings()
    inf[0, 0] = np.inf
    with pytest.raises(CacheError, match="inf"):
        write_cache(tmp_path / "c.h5", ratings={"q": inf}, **common)
    p = write_cache(tmp_path / "d.h5", ratings={"q": _ratings()}, **common)
    with h5py.File(p, "r+") as f:
        f["ratings/q"][0, 0] = np.inf
    with pytest.raises(CacheError, match="ratings/q holds inf"):
        read_cache(p)
    with h5py.File(p, "r+") as f:
        f["ratings/q"][0, 0] = 1
        f["ratings/z"] = np.zeros((3, 4), np.float32)
    with pytest.raises(CacheError, match="ratings/z is not one of the labels"):
        read_cache(p)
    with h5py.File(p, "r+") as f:
        del f["ratings/z"]
        f.create_dataset("rater_ids", data=np.array([["r"] * 5] * 3, dtype=object),
                         dtype=h5py.string_dtype())
    with pytest.raises(CacheError, match="one R"):
        read_cache(p)


def test_foreign_tells_what_is_there(synthetic_cache, tmp_path):
    """--force may replace only a cache qamro-pipe wrote: everything else is named."""
    from qamro_pipe.store.reader import foreign

    (tmp_path / "dir").mkdir()
    (tmp_path / "text.h5").write_text("id,path\n")
    (tmp_path / "empty.h5").write_bytes(b"")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    cut = tmp_path / "cut.h5"  # a damaged cache of ours still counts as ours
    cut.write_bytes(synthetic_cache.read_bytes()[:len(synthetic_cache.read_bytes()) // 3])
    (tmp_path / "link.h5").symlink_to(tmp_path / "gone.h5")
    assert foreign(tmp_path / "dir") == "a folder"
    assert foreign(tmp_path / "text.h5") == "a file that is not HDF5"
    assert foreign(tmp_path / "empty.h5") == "an empty file"
    assert foreign(tmp_path / "other.h5") == "an HDF5 file that is not a qamro-pipe cache"
    assert foreign(tmp_path / "link.h5") == "a symbolic link to nothing"
    inside = foreign(tmp_path / "text.h5" / "x.h5")
    assert inside == f"inside {tmp_path / 'text.h5'}, which is a file"
    assert foreign(cut) is None and foreign(synthetic_cache) is None
    assert foreign(tmp_path / "new" / "x.h5") is None


def _small_cache(path, ids, counts=None, values=None, **kw):
    n = len(ids)
    windows = {"layers": (2,)} if counts is not None else None
    p = create_cache(path, ids=ids, systems=["s"] * n, splits=["train"] * n,
                     labels=np.zeros((n, 1)), label_names=["q"], backbone="x@1", dataset="d",
                     config={}, feature_shapes={"audio": (3,)}, window_shapes=windows,
                     window_counts=counts, sources=[f"/a/{i}.wav" for i in ids],
                     source_stat=np.arange(2 * n).reshape(n, 2), **kw)
    return p


def test_row_copy_carries_rows_into_a_new_cache(tmp_path):
    """Kept rows land in their new places with their window rows, marked done; nothing else
    is done; runs of consecutive rows are copied together."""
    from qamro_pipe.store.writer import RowCopy

    old = _small_cache(tmp_path / "old.h5", ["a", "b", "c", "d", "e"], counts=[1, 2, 0, 3, 1])
    rng = np.random.default_rng(0)
    audio, layers = rng.normal(size=(5, 3)), rng.normal(size=(7, 2))
    off = [0, 1, 3, 3, 6, 7]
    with CacheWriter(old) as w:
        w.write(range(5), {"audio": audio},
                {"layers": [layers[off[i]:off[i + 1]] for i in range(5)]},
                [np.arange(off[i], off[i + 1], dtype=np.float32) for i in range(5)],
                stats=np.full((5, 2), 7))
        assert w.f["source_stat"][()].tolist() == [[7, 7]] * 5
    # new order: x (new), a, b, d, e; c was removed
    copy = RowCopy(old, np.array([0, 1, 3, 4]), np.array([1, 2, 3, 4]))
    assert list(copy.runs()) == [(0, 2, 1), (3, 5, 3)]
    new = _small_cache(tmp_path / "new.h5", ["x", "a", "b", "d", "e"], counts=[2, 1, 2, 3, 1],
                       copy_from=copy)
    c = read_cache(new, require_complete=False)
    assert c.usable.tolist() == [False, True, True, True, True]
    assert np.allclose(c.features["audio"][1:], audio[[0, 1, 3, 4]].astype(np.float32))
    new_off = c.window_offsets
    for new_row, old_row in ((1, 0), (2, 1), (3, 3), (4, 4)):
        got = c.windows["layers"][new_off[new_row]:new_off[new_row + 1]]
        assert np.allclose(got, layers[off[old_row]:off[old_row + 1]].astype(np.float32))
        assert np.array_equal(c.window_weight[new_off[new_row]:new_off[new_row + 1]],
                              np.arange(off[old_row], off[old_row + 1]))
    # a kept clip must own as many window rows in both files
    with pytest.raises(CacheError, match="other window counts"):
        _small_cache(tmp_path / "bad.h5", ["x", "a", "b", "d", "e"], counts=[2, 1, 1, 3, 1],
                     copy_from=copy)
    assert not (tmp_path / "bad.h5").exists() and not list(tmp_path.glob(".bad.h5.tmp-*"))


def test_a_skip_records_the_audio_it_failed_on(tmp_path):
    p = _small_cache(tmp_path / "c.h5", ["a", "b"])
    with CacheWriter(p) as w:
        w.skip({"b": "broken"}, {"b": (5, 9)})
    c = read_cache(p, require_complete=False)
    assert c.skipped == {"b": "broken"} and c.source_stat.tolist() == [[0, 1], [5, 9]]
