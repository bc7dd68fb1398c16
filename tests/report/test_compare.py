"""The utterance-level bootstrap of `compare` (report/compare.py): the counts-weighted
figures against the clip-by-clip definition, concatenating each resample's drawn systems'
clips (the loop below: numpy's Pearson, scipy's rankdata), with ties, systems of one clip,
and a resample whose values are all equal."""
import numpy as np
from scipy import stats

from qamro_pipe.report.compare import _utterance_rows


def _literal(true, pred, clips, idx):
    out = {"lcc": np.empty(len(idx)), "srcc": np.empty(len(idx))}
    for r, pick in enumerate(idx):
        rows = np.concatenate([clips[s] for s in pick])
        a, b = true[rows], pred[rows]
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            out["lcc"][r] = out["srcc"][r] = np.nan
            continue
        out["lcc"][r] = np.corrcoef(a, b)[0, 1]
        out["srcc"][r] = np.corrcoef(stats.rankdata(a), stats.rankdata(b))[0, 1]
    return out


def test_weighted_bootstrap_equals_concatenating_the_drawn_clips():
    rng = np.random.default_rng(0)
    sizes = [1, 3, 5, 8, 2, 6, 4]
    system_of = np.repeat(np.arange(len(sizes)), sizes)
    true = np.round(rng.uniform(1, 5, len(system_of)) * 5) / 5  # a 0.2 grid: ties
    pred = np.round(true + rng.normal(0, 0.5, len(true)), 1)  # ties too
    clips = [np.flatnonzero(system_of == s) for s in range(len(sizes))]
    idx = rng.integers(0, len(sizes), size=(300, len(sizes)))
    idx[0] = 0  # one resample of a single one-clip system: no correlation
    got, want = _utterance_rows(true, pred, clips, idx), _literal(true, pred, clips, idx)
    for fig in ("lcc", "srcc"):
        assert np.isnan(got[fig][0]) and np.isnan(want[fig][0])
        np.testing.assert_allclose(got[fig], want[fig], rtol=1e-10, atol=1e-12)
    assert np.isfinite(got["srcc"][1:]).mean() > 0.9
