"""Uncertainty a reader can use: the spread over members beside every mean, per-system
predicted MOS with an interval, and P(system A ranks above system B), checked on values."""
import csv
import json

import numpy as np
import pytest

from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.experiments.run import run_experiment
from qamro_pipe.report.evaluate import evaluate_run
from qamro_pipe.report.rankplot import plot_rank_matrix
from qamro_pipe.report.systems import system_scores
from qamro_pipe.store.reader import read_cache
from qamro_pipe.train.recipes import load_recipe

from kit.caches import make_synthetic_cache

SEEDS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uncertainty")
    cache = make_synthetic_cache(tmp / "synthetic.h5")
    members = [Member(LossConfig(), s) for s in range(SEEDS)]
    cfg = TrainConfig(max_epochs=15, bootstrap=0, batch_size=64, lr=0.01)
    folder, *_ = run_experiment(load_recipe("musiceval"), members, cfg, cache=cache,
                                out=tmp / "run")
    return folder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_csv_sd_is_the_sd_of_the_member_columns(run):
    """Fails without the change: predictions.csv had no sd column."""
    rows = read_csv(run / "predictions.csv")
    assert rows and {"sd_overall", "sd_textual"} <= set(rows[0])
    header = list(rows[0])
    assert header.index("sd_overall") == header.index("pred_overall") + 1  # next to the mean
    for r in rows:
        for h in ("overall", "textual"):
            members = np.array([float(r[f"pred_{h}_m{k}"]) for k in range(SEEDS)])
            assert float(r[f"sd_{h}"]) == pytest.approx(np.std(members, ddof=1), rel=1e-4,
                                                        abs=1e-6)
            assert float(r[f"pred_{h}"]) == pytest.approx(members.mean(), rel=1e-5)
    assert max(float(r["sd_overall"]) for r in rows) > 0  # the seeds do differ


def test_evaluate_writes_systems_and_the_rank_matrix_from_the_members(run):
    """systems.csv's predicted MOS is the mean over a system's clips of the mean over members
    (read back from the evaluation's own per-member columns); its interval holds it; the
    matrix is ordered by predicted MOS and P(A>B) + P(B>A) <= 1."""
    folder, metrics = evaluate_run(run, n_boot=400)
    cache = read_cache(json.loads((run / "config.json").read_text())["cache"])
    preds = read_csv(folder / "predictions.csv")
    systems = read_csv(folder / "systems.csv")
    summary = metrics["systems"]
    assert summary["computable"] and summary["resamples"] == 400
    for head in ("overall", "textual"):
        mine = [s for s in systems if s["head"] == head]
        assert [int(s["rank"]) for s in mine] == list(range(1, len(mine) + 1))
        mos = [float(s["pred_mos"]) for s in mine]
        assert mos == sorted(mos, reverse=True)
        for s in mine:
            clips = [p for p in preds if p["system"] == s["system"]]
            per_member = np.array([[float(p[f"pred_{head}_m{k}"]) for k in range(SEEDS)]
                                   for p in clips])  # [clips, members]
            assert int(s["clips"]) == len(clips)
            assert float(s["pred_mos"]) == pytest.approx(per_member.mean(), abs=1e-5)
            assert float(s["sd_members"]) == pytest.approx(
                per_member.mean(0).std(ddof=1), rel=1e-3, abs=1e-6)
            assert float(s["ci_lo"]) <= float(s["pred_mos"]) <= float(s["ci_hi"])
            col = cache.label_names.index(head)  # the published system MOS, as the figures
            assert float(s["true_mos"]) == pytest.approx(cache.system_mos[s["system"]][col])
        matrix = read_csv(folder / summary["heads"][head]["matrix"])
        names = [r["system"] for r in matrix]
        assert names == [s["system"] for s in mine]
        p = np.array([[float(r[c]) if r[c] else np.nan for c in names] for r in matrix])
        assert np.isnan(np.diag(p)).all()
        off = ~np.eye(len(names), dtype=bool)
        assert ((p + p.T)[off] <= 1 + 1e-9).all() and ((p + p.T)[off] > 0.99).all()
        assert (folder / summary["heads"][head]["picture"]).stat().st_size > 10_000
    on_file = json.loads((folder / "metrics.json").read_text())
    assert on_file["systems"]["heads"]["overall"]["best"] == systems[0]["system"]


def transcribed_bootstrap(preds, systems, n_boot, seed):
    """The module docstring's resampling as plain loops over resamples, drawing from the
    generator in the implementation's order (member weights first, then each system's
    clips), so the two must agree value for value."""
    rng = np.random.default_rng(seed)
    m = len(preds)
    weights = (rng.multinomial(m, np.full(m, 1 / m), size=n_boot) / m if m > 1
               else np.ones((n_boot, 1)))
    names = np.unique(systems)
    picks = {s: rng.integers(0, (systems == s).sum(), size=(n_boot, (systems == s).sum()))
             for s in names}
    scores = np.zeros((n_boot, len(names)))
    for r in range(n_boot):
        for j, s in enumerate(names):
            clips = preds[:, systems == s]
            per_clip = sum(weights[r, k] * clips[k] for k in range(m))
            scores[r, j] = np.mean([per_clip[i] for i in picks[s][r]])
    above = np.zeros((len(names), len(names)))
    ties = np.zeros_like(above)
    for a in range(len(names)):
        for b in range(len(names)):
            above[a, b] = np.mean([scores[r, a] > scores[r, b] for r in range(n_boot)])
            ties[a, b] = np.mean([scores[r, a] == scores[r, b] for r in range(n_boot)])
    return names, scores, above, ties


@pytest.mark.parametrize("members", [1, 4])
def test_rank_probabilities_equal_a_loop_over_resamples(members):
    rng = np.random.default_rng(3)
    systems = np.array(["A"] * 5 + ["B"] * 7 + ["C"] * 4 + ["D"] * 6)
    preds = rng.normal(np.repeat([3.0, 3.1, 2.5, 3.05], [5, 7, 4, 6]), 0.4,
                       size=(members, len(systems)))
    s = system_scores(preds, systems, n_boot=200, seed=5)
    names, scores, above, ties = transcribed_bootstrap(preds, systems, 200, seed=5)
    order = [list(names).index(x) for x in s.names]
    mos = {x: preds[:, systems == x].mean() for x in names}
    assert list(s.names) == sorted(names, key=lambda x: -mos[x])
    assert np.allclose(s.mos, [mos[x] for x in s.names])
    off = ~np.eye(4, dtype=bool)
    assert np.allclose(s.above[off], above[np.ix_(order, order)][off])
    assert np.allclose(s.ties[off], ties[np.ix_(order, order)][off])
    lo, hi = np.quantile(scores, [0.025, 0.975], axis=0)
    assert np.allclose(s.lo, lo[order]) and np.allclose(s.hi, hi[order])
    # P(A > B) + P(B > A) = 1 - P(tie), for every pair
    assert np.allclose((s.above + s.above.T)[off], 1 - s.ties[off])


def test_ties_count_for_neither_side():
    """Two systems whose every clip scores the same: every resample ties."""
    systems = np.array(["A", "A", "B", "B", "C"])
    preds = np.array([[3.0, 3.0, 3.0, 3.0, 1.0]])
    s = system_scores(preds, systems, n_boot=50)
    a, b, c = (list(s.names).index(x) for x in "ABC")
    assert s.above[a, b] == s.above[b, a] == 0 and s.ties[a, b] == 1
    assert s.above[a, c] == 1 and s.ties[a, c] == 0


def test_interval_widths_follow_clips_and_members():
    """One member: the interval is a system's clip sampling, about mean ± 1.96 sd/sqrt(n).
    Members that are constants over the clips: resampling clips moves nothing, resampling
    members does, so a run's seeds widen the interval."""
    rng = np.random.default_rng(0)
    n = 400
    clips = rng.normal(3.0, 0.5, n)
    s = system_scores(clips[None], np.array(["A"] * n), n_boot=4000)
    expected = 2 * 1.96 * clips.std() / np.sqrt(n)
    assert s.hi[0] - s.lo[0] == pytest.approx(expected, rel=0.1)
    assert s.member_sd is None
    constant = np.repeat([[2.8], [3.0], [3.2]], 10, axis=1)  # [3 members, 10 clips]
    s = system_scores(constant, np.array(["A"] * 10), n_boot=2000)
    assert s.hi[0] - s.lo[0] > 0.2 and s.member_sd[0] == pytest.approx(0.2)
    one = system_scores(constant[:1], np.array(["A"] * 10), n_boot=2000)
    assert one.hi[0] == one.lo[0] == pytest.approx(2.8)


def test_rank_picture_shows_the_matrix_in_ranking_order(tmp_path):
    """What a reader sees: the image is the matrix, rows and columns named in the order of
    the predicted MOS with its interval, a colour bar from 0 to 1, and the number of
    resamples in the title and the footnote; 36 systems (AES-Natural's eval set) fit."""
    rng = np.random.default_rng(1)
    systems = np.repeat([f"sys{i:02d}" for i in range(36)], 20)
    preds = rng.normal(np.repeat(np.linspace(2, 4, 36), 20), 0.5, size=(2, len(systems)))
    s = system_scores(preds, systems, n_boot=300)
    fig = plot_rank_matrix(tmp_path / "rank.png", s, "PQ", "eval")
    ax, bar = fig.axes
    shown = np.ma.getdata(ax.images[0].get_array())
    assert np.allclose(shown[~np.eye(36, dtype=bool)], s.above[~np.eye(36, dtype=bool)])
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert [r.split()[0] for r in rows] == list(s.names)
    assert rows[0] == f"{s.names[0]}  {s.mos[0]:.2f} [{s.lo[0]:.2f}, {s.hi[0]:.2f}]"
    assert [t.get_text() for t in ax.get_xticklabels()] == list(s.names)
    assert bar.get_ylim() == (0.0, 1.0)
    text = " ".join(t.get_text() for t in fig.texts).replace("\u00a0", " ")
    assert "R = 300" in fig._suptitle.get_text() and "R = 300 bootstrap resamples" in text
    assert "2 members" in text and "'eval' split" in text
    assert not ax.texts  # 36 systems: no numbers crammed into the cells
    label_box = ax.get_yticklabels()[0].get_window_extent(fig.canvas.get_renderer())
    assert label_box.x0 >= 0  # the longest row label is inside the figure
    assert (tmp_path / "rank.png").stat().st_size > 10_000
