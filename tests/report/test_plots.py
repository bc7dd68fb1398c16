"""sweep.png and curves.png, read back from the matplotlib figures drawn from a real run.

One batched training run on the planted synthetic cache holds every picture's members: the
paper's beta grid (1, 3, ..., 11), an alpha sweep at beta 7 and Table I's ablation rows
(regression only, L_MR), 3 seeds each. Each test draws a figure from a subset of its
sweep_rows and checks what a reader sees: ticks, limits, colours, legend, footnote."""
import csv
import math

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from qamro_pipe.config import LossConfig, TrainConfig, to_jsonable
from qamro_pipe.errors import DataError
from qamro_pipe.experiments.run import run_experiment
from qamro_pipe.experiments.sweep import expand_grid, sweep_rows
from qamro_pipe.report.curves import curve_panels, plot_curves, write_curves
from qamro_pipe.report.plots import eval_counts, plot_sweep, setting_key
from qamro_pipe.train.recipes import load_recipe

from kit.caches import make_synthetic_cache

BETAS = [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]
ALPHAS = [0.1, 0.2, 0.5]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plots")
    cache = make_synthetic_cache(tmp / "synthetic.h5")
    base = LossConfig()
    members = list(dict.fromkeys(
        expand_grid(base, {"loss": ["qamro"], "alpha": [0.2], "beta": BETAS, "seeds": 3})
        + expand_grid(base, {"loss": ["qamro"], "alpha": ALPHAS, "beta": [7], "seeds": 3})
        + expand_grid(base, {"loss": ["none", "mr"], "margin": [0.1], "seeds": 3})))
    cfg = TrainConfig(max_epochs=10, bootstrap=0, batch_size=64, lr=0.01, check_every=1)
    folder, metrics, _, _ = run_experiment(load_recipe("musiceval"), members, cfg, cache=cache,
                                           out=tmp / "sweep", kind="sweep")
    return folder, metrics, sweep_rows(metrics)


def pick(rows, **want):
    return [r for r in rows if all(r.get(k) == v for k, v in want.items())]


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def figure_text(fig) -> str:
    """The footnote as read: its no-break spaces (kept together in wrapping) are spaces."""
    return " ".join(t.get_text() for t in fig.texts).replace("\u00a0", " ").replace("\n", " ")


def boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_beta_sweep_puts_the_grid_on_x_and_says_what_the_bars_are(run, tmp_path):
    folder, metrics, rows = run
    n = eval_counts(metrics)
    fig = plot_sweep(tmp_path / "beta.png", pick(rows, loss="qamro", alpha=0.2), n_systems=n,
                     split=metrics["eval_split"])
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["overall", "textual"]
    for ax in axes:
        assert list(ax.get_xticks()) == BETAS  # 1, 3, ..., 11, not matplotlib's 2, 4, 6
        assert "β" in ax.get_xlabel()
        assert ax.get_ylim()[1] <= 1.0
    assert axes[0].get_ylim() == axes[1].get_ylim()  # heads compared on one scale
    assert "α=0.2" in fig.get_suptitle()  # the setting held fixed is named
    note = figure_text(fig)
    assert "n = 3 seeds" in note and "± 1 sd" in note
    assert n["overall"] == metrics["members"][0]["heads"]["overall"]["system"]["n"]
    assert f"n = {n['overall']} systems" in note and "'dev' split" in note
    assert (tmp_path / "beta.png").stat().st_size > 10_000
    assert (folder / "sweep.png").stat().st_size > 10_000  # the run's own call site drew one


def test_alpha_sweep_draws_alpha_on_x(run):
    _, metrics, rows = run
    fig = plot_sweep(None, pick(rows, loss="qamro", beta=7.0), n_systems=eval_counts(metrics))
    for ax in visible_axes(fig):
        assert list(ax.get_xticks()) == ALPHAS
        assert "α" in ax.get_xlabel() and "β" not in ax.get_xlabel()


def test_ablation_colours_differ_and_the_legend_covers_no_data(run):
    _, metrics, rows = run
    rows = [r for r in rows if r["loss"] != "qamro" or (r["alpha"] == 0.2 and r["beta"] in
                                                         (1.0, 7.0))]
    fig = plot_sweep(None, rows, n_systems=eval_counts(metrics))
    fig.canvas.draw()
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["QAMRO α=0.2", "L_MR margin=0.1", "regression only"]
    colours = [to_rgba(h.get_color() if hasattr(h, "get_color") else h[0].get_color())
               for h in legend.legend_handles]
    assert len(set(colours)) == 3  # regression only no longer shares qamro's colour
    box = legend.get_window_extent()
    assert not any(boxes_overlap(box, ax.get_window_extent()) for ax in visible_axes(fig))
    for ax in visible_axes(fig):
        assert list(ax.get_xticks()) == [1.0, 7.0]
    assert "shaded bands" in figure_text(fig)  # the reference levels' spread is explained


def test_two_swept_settings_give_one_line_per_value_of_the_other(run):
    _, _, rows = run
    fig = plot_sweep(None, rows)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["QAMRO α=0.1", "QAMRO α=0.2", "QAMRO α=0.5", "L_MR margin=0.1",
                      "regression only"]
    assert list(visible_axes(fig)[0].get_xticks()) == BETAS


def test_correlations_stop_at_1_and_the_clipping_is_said(run):
    """SRCC near 1 with a spread over seeds: mean + sd would pass 1."""
    _, _, rows = run
    near = [dict(r, srcc={0: 1.0, 1: 0.99, 2: 0.95}[r["seed"]])  # mean 0.98, sd 0.026
            for r in pick(rows, loss="qamro", alpha=0.2)]
    fig = plot_sweep(None, near, n_systems=12)
    for ax in visible_axes(fig):
        assert ax.get_ylim()[1] <= 1.0
        for container in ax.containers:
            for collection in container.lines[2]:
                tops = [max(y for _, y in seg) for seg in collection.get_segments()]
                assert max(tops) == pytest.approx(1.0) and max(tops) <= 1.0
    assert "clipped at 1" in figure_text(fig) and "n = 12 systems" in figure_text(fig)


def test_nothing_swept_gives_one_category_per_setting(run):
    _, _, rows = run
    rows = [r for r in rows if r["loss"] != "qamro" or (r["alpha"] == 0.2 and r["beta"] == 7)]
    fig = plot_sweep(None, rows, metric="mse", level="utterance")
    ax = visible_axes(fig)[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["QAMRO\nα=0.2 β=7", "L_MR\nmargin=0.1", "regression\nonly"]
    assert ax.get_ylim()[0] >= 0  # an MSE axis does not go below 0
    assert "Utterance-level MSE" in figure_text(fig)


def history_rows(metrics, start=5.0, floor=0.2):
    """Per-epoch losses in the layout the trainer's history.csv is specified with
    (member,epoch,train_loss,val_loss,train_rank,train_reg,val_rank,val_reg; issue 13 item 1:
    the trainer does not write it yet). Each member's rows stop at its stopped_epoch, and its
    validation loss is lowest at its best_epoch, as recorded in the run's metrics.json."""
    rows = []
    for k, m in enumerate(metrics["members"]):
        best, stop = m["best_epoch"], m["stopped_epoch"]
        for e in range(1, stop + 1):
            val = floor * (1 + k / 50) + start * math.exp(-e / 2) + 0.02 * abs(e - best)
            train = floor / 2 + start * math.exp(-e / 2.5)
            rows.append({"member": str(k), "epoch": str(e), "train_loss": f"{train:.6g}",
                         "val_loss": f"{val:.6g}", "train_rank": "", "train_reg": "",
                         "val_rank": "", "val_reg": ""})
    return rows


def write_history(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_curves_one_colour_per_setting_best_epochs_marked(run, tmp_path):
    _, metrics, _ = run
    members = metrics["members"]
    write_history(tmp_path / "history.csv", history_rows(metrics))
    write_curves(tmp_path, members)  # through the file, as a run folder holds it
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    fig = plot_curves(None, history_rows(metrics), members)
    (ax,) = visible_axes(fig)
    settings = {setting_key(m["loss"]) for m in members}
    val = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert len(val) == len(members)  # drawn in member order
    colour = {}
    for m, line in zip(members, val):
        colour.setdefault(setting_key(m["loss"]), set()).add(to_rgba(line.get_color()))
    assert all(len(c) == 1 for c in colour.values())  # a setting's seeds share a colour
    assert len({c.pop() for c in colour.values()}) == len(settings)  # settings differ
    marked = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(marked[:, 0]) == sorted(m["best_epoch"] for m in members)
    assert ax.get_yscale() == "log"  # losses from ~5 down to ~0.2
    fig.canvas.draw()
    first = fig.legends[0]
    assert len(first.get_texts()) == len(settings)  # a legend per setting, not per member
    assert not boxes_overlap(first.get_window_extent(), ax.get_window_extent())


def test_curves_of_60_members_split_into_panels_by_alpha(tmp_path):
    """60 members, 20 settings: one panel per alpha, the betas coloured alike in each."""
    members = expand_grid(LossConfig(), {"loss": ["qamro"], "alpha": [0.1, 0.2, 0.3, 0.5],
                                         "beta": [1, 3, 5, 7, 9], "seeds": 3})
    entries = [{"member": m.label(), "seed": m.seed, "loss": to_jsonable(m.loss),
                "best_epoch": 4 + k % 7, "stopped_epoch": 12 + k % 9}
               for k, m in enumerate(members)]
    metrics = {"members": entries}
    split, panels = curve_panels(sorted({setting_key(e["loss"]) for e in entries}))
    assert split == "alpha" and len(panels) == 4
    fig = plot_curves(tmp_path / "curves.png", history_rows(metrics), entries)
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == [f"QAMRO α={a:g}" for a in (0.1, 0.2, 0.3, 0.5)]
    assert all(len([ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]) == 15
               for ax in axes)
    assert len({ax.get_ylim() for ax in axes}) == 1  # shared axes
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        f"QAMRO β={b}" for b in (1, 3, 5, 7, 9)]


def test_bad_history_rows_name_the_file_and_line(run, tmp_path):
    _, metrics, _ = run
    rows = history_rows(metrics)
    rows[3]["member"] = str(len(metrics["members"]))
    write_history(tmp_path / "history.csv", rows)
    with pytest.raises(DataError, match=r"history\.csv line 5: member \d+, but the run has"):
        write_curves(tmp_path, metrics["members"])
    with pytest.raises(DataError, match="history line 2: needs numbers in columns member"):
        plot_curves(None, [{"member": "0", "epoch": "x", "train_loss": "1", "val_loss": "1"}],
                    metrics["members"])
    assert not (tmp_path / "curves.png").exists()


def test_curves_accept_a_numpy_record_array(run):
    _, metrics, _ = run
    rows = history_rows(metrics)
    table = np.array([(int(r["member"]), int(r["epoch"]), float(r["train_loss"]),
                       float(r["val_loss"])) for r in rows],
                     dtype=[("member", "i8"), ("epoch", "i8"), ("train_loss", "f8"),
                            ("val_loss", "f8")])
    fig = plot_curves(None, table, metrics["members"])
    val = [ln for ln in visible_axes(fig)[0].get_lines() if ln.get_linestyle() == "-"]
    assert len(val) == len(metrics["members"])
