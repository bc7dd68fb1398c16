"""Issue 15 item 2: the losses table (stages/table-losses.toml) through the real CLI on a
planted fixture cache, and its comparison with QAMRO: per row figures with 95% intervals
from resampled systems and the paired bootstrap P(row's system SRCC > QAMRO's)."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import LOSS_KINDS
from qamro_pipe.errors import QamroError
from qamro_pipe.metrics import bootstrap_ci, system_scores
from qamro_pipe.report.compare import compare_rows
from qamro_pipe.train.recipes import load_table

from kit.caches import make_synthetic_cache


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_table_has_a_row_for_every_loss_kind():
    t = load_table("table-losses")
    assert sorted(r.get("loss") for _, r in t.rows) == sorted(LOSS_KINDS)
    assert t.compare == "QAMRO"


def test_table_losses_end_to_end_on_a_planted_cache(tmp_path):
    cache = make_synthetic_cache(tmp_path / "planted.h5", n_systems=14)
    out = tmp_path / "table"
    r = invoke("table", "--recipe", "table-losses", "--cache", cache, "--seeds", 2,
               "--max-epochs", 6, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    result = json.loads((out / "compare.json").read_text())
    t = load_table("table-losses")
    for head in ("overall", "textual"):
        c = result[head]
        assert list(c["rows"]) == [name for name, _ in t.rows]  # every row, table order
        assert c["rows"]["QAMRO"]["p_above"] is None
        for name, rec in c["rows"].items():
            for level in ("system", "utterance"):
                lo, hi = rec[level]["srcc_ci"]
                assert lo <= hi and -1 <= lo and hi <= 1
            if name != "QAMRO":
                assert 0 <= rec["p_above"] <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    n = metrics["members"][0]["heads"]["overall"]["system"]["n"]
    assert result["overall"]["systems"] == n
    md = (out / "compare.md").read_text()
    assert f"n = {n} systems" in md and "P(> QAMRO)" in md and "not told apart" in md
    assert "P(> QAMRO)" in r.output and (out / "table.md").exists()
    assert "compare.md, .csv and .json" in r.output  # the last line names every file written


def test_a_compare_row_that_names_no_row_is_refused(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('model = "musiceval"\ncompare = "nope"\n[[rows]]\nname = "a"\nloss = "none"\n')
    with pytest.raises(QamroError, match="compare = 'nope' names no row"):
        load_table(bad)


def _systems(n_systems=30, per=10, seed=0):
    rng = np.random.default_rng(seed)
    systems = np.repeat([f"S{i:02d}" for i in range(n_systems)], per)
    quality = np.repeat(rng.uniform(1, 5, n_systems), per)
    true = np.round((quality + rng.normal(0, 0.5, len(systems))) * 5) / 5  # 0.2 grid
    return rng, systems, quality, true


def test_system_intervals_are_the_runs_own_bootstrap():
    """The same resamples as metrics.bootstrap_ci (what metrics.json's intervals are)."""
    rng, systems, quality, true = _systems()
    pred = quality + rng.normal(0, 0.6, len(true))
    c = compare_rows(true, systems, {"A": pred}, "A", n_boot=500)
    _, st, sp, _ = system_scores(systems, true, pred)
    assert c["rows"]["A"]["system"]["srcc_ci"] == pytest.approx(
        bootstrap_ci(st, sp, 500)["srcc"], abs=1e-12)


def test_paired_bootstrap_separates_only_real_differences():
    """30 systems: a row ~0.02 SRCC from the reference gets a P well inside (0.05, 0.95);
    a far better row gets P near 1, a far worse near 0; an identical row 0 (ties count for
    neither side)."""
    rng, systems, quality, true = _systems()
    ref = quality + rng.normal(0, 1.2, len(true))  # clip-level noise
    close = ref + np.repeat(rng.normal(0, 0.1, 30), 10)
    worse = quality + rng.normal(0, 5.0, len(true))
    better = quality + rng.normal(0, 0.05, len(true))
    c = compare_rows(true, systems, {"ref": ref, "close": close, "worse": worse,
                                     "better": better, "same": ref.copy()}, "ref")
    rows = c["rows"]
    gap = abs(rows["close"]["system"]["srcc"] - rows["ref"]["system"]["srcc"])
    assert 0 < gap <= 0.03 and 0.05 < rows["close"]["p_above"] < 0.95
    assert rows["better"]["p_above"] > 0.95 and rows["worse"]["p_above"] < 0.05
    assert rows["same"]["p_above"] == 0.0
    assert c["systems"] == 30 and c["clips"] == 300
