"""`extract --keep-windows` (issue 23 item 4): a backbone that pools its audio feature over a
clip's windows (melstats here; CLAP the same way) also writes each window's row, so
`train --pool attention` can pool them by attention; the pooled rows stay as they were, and
the Scorer re-extracts files the same way, so an attention run scores files as it scored
the cache."""
import csv

import numpy as np
import pytest
import soundfile as sf

from qamro_pipe.config import ExtractConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.extract.backbones.base import RANDOM_WEIGHTS
from qamro_pipe.extract.datasets import Clip, DatasetRecords
from qamro_pipe.extract.loop import extract
from qamro_pipe.store.reader import read_cache

from kit.backbones import tone_mix
from kit.cli import invoke

SECONDS = (4.0, 12.5, 25.0)  # 1, 2 and 3 windows of 10 s


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A manifest of 18 clips of 1-3 windows, 3 systems, scores that follow the level."""
    root = tmp_path_factory.mktemp("keep")
    rows = []
    for i in range(18):
        s = SECONDS[i % 3]
        level = 0.2 + 0.15 * (i % 6)
        path = root / f"c{i:02d}.wav"
        sf.write(path, level * tone_mix(16000, s, seed=i), 16000)
        rows.append({"id": f"c{i:02d}", "path": str(path), "system": f"S{i % 3}",
                     "mos": f"{1 + 4 * (i % 6) / 5:.1f}"})
    manifest = root / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root, manifest


@pytest.fixture(scope="module")
def extracted(corpus):
    """The corpus extracted with --keep-windows and without: (kept, plain) cache paths."""
    root, manifest = corpus
    kept, plain = root / "kept.h5", root / "plain.h5"
    for out, extra in ((kept, ["--keep-windows"]), (plain, [])):
        r = invoke("extract", "--manifest", manifest, "--backbone", "melstats", "--workers",
                   "0", "--out", out, "--quiet", *extra)
        assert r.exit_code == 0, r.output
    return kept, plain


def test_window_rows_beside_the_pooled_rows(extracted):
    k, p = (read_cache(path) for path in extracted)
    np.testing.assert_array_equal(k.features["audio"], p.features["audio"])  # as before
    assert "audio" not in p.windows and "text" not in k.windows
    counts = np.diff(k.window_offsets)
    assert counts.tolist() == [1, 2, 3] * 6
    for c in range(len(k.ids)):  # the pooled row is the length-weighted mean of the rows
        sl = slice(k.window_offsets[c], k.window_offsets[c + 1])
        w = k.window_weight[sl].astype(np.float64)
        np.testing.assert_allclose(k.features["audio"][c],
                                   (w[:, None] * k.windows["audio"][sl]).sum(0) / w.sum(),
                                   rtol=1e-5, atol=1e-6)
    assert k.meta.config["extract"]["keep_windows"] is True


def test_an_attention_run_scores_files_as_it_scored_the_cache(corpus, extracted, tmp_path):
    """train --pool attention on the kept windows; evaluate's heads on the cache equal the
    Scorer on the same files (re-extracted in memory with the windows kept)."""
    from qamro_pipe import Scorer
    from qamro_pipe.report.evaluate import TrainedRun

    root, cache = corpus[0], extracted[0]
    run = tmp_path / "run"
    r = invoke("train", "--cache", cache, "--pool", "attention", "--seeds", "2",
               "--max-epochs", "5", "--out", run, "--quiet")
    assert r.exit_code == 0, r.output
    data = read_cache(cache)
    preds = TrainedRun(run).predict(data)
    head = next(iter(preds))
    paths = [root / f"c{i:02d}.wav" for i in range(6)]
    got = Scorer.load(run, device="cpu").score([str(p) for p in paths])
    at = {c: i for i, c in enumerate(data.ids)}
    for row, p in zip(got, paths):
        assert row[head] == pytest.approx(preds[head][:, at[p.stem]].mean(), abs=1e-5)


def test_refused_where_the_features_are_per_window_already(tmp_path):
    clip = Clip(id="a", path=tmp_path / "a.wav", system="", split="train", labels=())
    sf.write(clip.path, tone_mix(16000, 1.0), 16000)
    records = DatasetRecords(name="x", label_names=(), clips=[clip])
    with pytest.raises(QamroError, match="per window already"):
        extract(records, ExtractConfig(backbone="aesthetics", checkpoint=RANDOM_WEIGHTS,
                                       device="cpu", workers=0, keep_windows=True),
                tmp_path / "x.h5", progress=False)
    assert not (tmp_path / "x.h5").exists()
