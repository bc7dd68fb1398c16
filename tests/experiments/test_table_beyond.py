"""`make table-beyond` (issue 23 item 7): every option of docs/beyond.md a row trained against
QAMRO with random batches, all rows' members in one batched run, each row compared with QAMRO
by the paired bootstrap over systems, the top tier beside the correlations; the rows trained on
preference pairs run with --pairs FILE and are left out, with a note, without one."""
import json

import numpy as np
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import LossConfig, TrainConfig
from qamro_pipe.experiments.tables import table_members, without_pair_rows
from qamro_pipe.store import read_cache
from qamro_pipe.train.recipes import load_table

from kit.caches import make_synthetic_cache


def test_rows_are_the_options_and_members_differ():
    t = load_table("table-beyond")
    members, row_of = table_members(t, LossConfig(), 2)
    losses = {row_of[m]: m.loss for m in members}
    assert losses["QAMRO"] == LossConfig()  # random batches, fixed weights, no system term
    assert {losses[r].batch_by for r in losses} == {"random", "prompt", "system"}
    assert losses["system Spearman"].kind == "system"
    assert losses["QAMRO + system 0.5"].system_weight == 0.5
    assert losses["QAMRO, learned weights"].loss_weighting == "uncertainty"
    assert losses["QAMRO, attention pooling"].pool == "attention"
    assert losses["QAMRO + pairs 1"].pair_weight == 1.0
    assert {r for r, x in losses.items() if x.pair_weight} == {
        "QAMRO + pairs 1", "regression + pairs 1", "pairs alone"}
    assert losses["pairs alone"].regression_weight == 0.0
    assert len({m.label() for m in members}) == len(members) == 2 * len(t.rows)
    assert t.compare == "QAMRO" and {"top_f1", "p_at_k"} <= set(t.figures)


def test_pair_rows_need_a_pairs_file():
    t = load_table("table-beyond")
    kept, note = without_pair_rows(t, TrainConfig())
    assert [r for r, _ in kept.rows] == [r for r, s in t.rows if not s.get("pair_weight")]
    assert "'QAMRO + pairs 1', 'regression + pairs 1', 'pairs alone' train on preference " \
        "pairs" in note
    assert "--pairs FILE" in note
    assert without_pair_rows(t, TrainConfig(pairs="p.jsonl")) == (t, None)


def test_table_beyond_end_to_end_on_a_planted_cache(tmp_path):
    n_systems, per = 14, 12
    ids = [f"audiomos2025-track1-S{s:03d}_P{p:03d}" for s in range(n_systems)
           for p in range(per)]
    cache = make_synthetic_cache(tmp_path / "planted.h5", n_systems=n_systems, per_system=per,
                                 ids=ids)
    rng = np.random.default_rng(0)  # pairs of clips (file stem = clip id), the better wins
    labels = dict(zip(ids, read_cache(cache).labels[:, 0]))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"audio_a": f"{a}.wav", "audio_b": f"{b}.wav",
                                         "winner": "A" if labels[a] >= labels[b] else "B"})
                             + "\n" for a, b in (rng.choice(ids, 2, replace=False)
                                                 for _ in range(300))))
    out = tmp_path / "table"
    r = CliRunner().invoke(app, ["table", "--recipe", "table-beyond", "--cache", str(cache),
                                 "--seeds", "2", "--max-epochs", "6", "--out", str(out),
                                 "--quiet", "--pairs", str(pairs)])
    assert r.exit_code == 0, r.output
    t = load_table("table-beyond")
    result = json.loads((out / "compare.json").read_text())
    for head in ("overall", "textual"):
        rows = result[head]["rows"]
        # the planted cache has clip features only: the attention row is left out, said so
        assert list(rows) == [name for name, _ in t.rows if name != "QAMRO, attention pooling"]
        assert rows["QAMRO"]["p_above"] is None
        assert all(0 <= rows[n]["p_above"] <= 1 for n in rows if n != "QAMRO")
    table = (out / "table.md").read_text()
    assert "TOP_F1" in table and "P_AT_K" in table
    for said in (table, r.output):
        assert "row 'QAMRO, attention pooling' left out" in said and "--keep-windows" in said
    metrics = json.loads((out / "metrics.json").read_text())
    labels = [m["member"] for m in metrics["members"]]
    assert any("batches=prompt" in x for x in labels) and any("weights=uncertainty" in x
                                                              for x in labels)
    sys_m = metrics["members"][0]["heads"]["overall"]["system"]
    assert sys_m["top_k"] == 5 and np.isfinite(sys_m["srcc"])
