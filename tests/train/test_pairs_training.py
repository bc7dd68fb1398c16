"""Preference pairs train heads (issue 23 item 6): the Bradley-Terry term checked against a
literal pair-by-pair transcription (losses_reference.py) in value and gradient (float64,
ties, pairs without an outcome), pairs joined to the cache's training clips only (a
validation or eval clip's pair never trains), a clip paired with itself refused, window-level
caches refused, members with and without pairs independent in one run, resume equal to an
uninterrupted run, and pairs moving the heads the right way where MOS labels are scarce.

The pairs files are written in the layout of docs/preference.md (ours: id, audio_a, audio_b,
winner), each pair judged by the demo corpus's simulated raters (demo.rated_preference:
integer 1-5 ratings around each clip's score, sd 0.6, the majority of 5 wins)."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.experiments.naming import loss_part
from qamro_pipe.extract.datasets.demo import rated_preference
from qamro_pipe.loss_kinds import member_label
from qamro_pipe.pairs_file import read_pairs
from qamro_pipe.store import read_cache
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.losses_reference import bradley_terry_loss_literal
from qamro_pipe.train.pairs_join import join_pairs, training_clips
from qamro_pipe.train.pairs_term import bradley_terry_loss
from qamro_pipe.train.trainer import make_split, train

from kit.caches import make_synthetic_cache, per_layer_cache, small_recipe
from kit.resume import stopped_then_resumed

NAN = float("nan")
HEADS = (HeadSpec("overall", "overall", ("audio",)),
         HeadSpec("textual", "textual", ("audio", "text")))
CFG = TrainConfig(max_epochs=30, patience=5, lr=0.02, bootstrap=0, checkpoint_seconds=0.0,
                  batch_size=64)


def write_pairs(path, ids, scores, n, seed=0, rows=None):
    """n pairs of clips (by id: file stem = clip id) among `rows`, each judged by the demo
    corpus's raters from the clips' scores."""
    rng = np.random.default_rng(seed)
    rows = np.arange(len(ids)) if rows is None else np.asarray(rows)
    lines = []
    for i in range(n):
        a, b = rng.choice(rows, 2, replace=False)
        lines.append({"id": f"p{i}", "prompt": "", "audio_a": f"clips/{ids[a]}.wav",
                      "audio_b": f"clips/{ids[b]}.wav",
                      "winner": rated_preference(scores[a], scores[b], rng)})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# -- the term --------------------------------------------------------------------------------
def _pairs(seed, n=40):
    g = torch.Generator().manual_seed(seed)
    pa = torch.randn(n, generator=g, dtype=torch.float64) * 2
    pb = torch.randn(n, generator=g, dtype=torch.float64) * 2
    outcome = torch.tensor([1.0, 0.0, 0.5, NAN], dtype=torch.float64)[
        torch.randint(0, 4, (n,), generator=g)]
    return pa, pb, outcome


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_literal_formula_in_value_and_gradient(seed):
    pa, pb, outcome = _pairs(seed)
    a1, b1 = pa.clone().requires_grad_(), pb.clone().requires_grad_()
    a2, b2 = pa.clone().requires_grad_(), pb.clone().requires_grad_()
    ours = bradley_terry_loss(a1, b1, outcome)
    lit = bradley_terry_loss_literal(a2, b2, outcome)
    ours.backward()
    lit.backward()
    assert ours.dim() == 0 and ours.item() == pytest.approx(lit.item(), rel=1e-12)
    assert torch.allclose(a1.grad, a2.grad, rtol=1e-10, atol=1e-14)
    assert torch.allclose(b1.grad, b2.grad, rtol=1e-10, atol=1e-14)
    none = torch.isnan(outcome)
    assert none.any() and (a1.grad[none] == 0).all() and (b1.grad[none] == 0).all()
    # batched over members: each row its own mean
    both = bradley_terry_loss(torch.stack([pa, pb]), torch.stack([pb, pa]), outcome)
    assert both[0].item() == pytest.approx(lit.item(), rel=1e-12)


def test_a_tie_is_least_at_equal_scores_and_wins_push_apart():
    d = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    tie = bradley_terry_loss(d, torch.zeros(3, dtype=torch.float64), torch.full((3,), 0.5))
    tie.backward()
    assert d.grad[1] == 0 and d.grad[0] < 0 < d.grad[2]  # pulled toward d = 0
    won = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bradley_terry_loss(won, torch.zeros(1, dtype=torch.float64), torch.ones(1)).backward()
    assert won.grad[0] < 0  # a descent step raises the winner
    assert bradley_terry_loss(won.detach(), won.detach(), torch.ones(1)).item() == \
        pytest.approx(np.log(2))


def test_no_outcome_scores_zero_with_zero_gradient():
    pa = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss = bradley_terry_loss(pa, torch.zeros(5, dtype=torch.float64), torch.full((5,), NAN))
    loss.backward()
    assert loss.item() == 0 and (pa.grad == 0).all()


# -- pairs joined to a cache -----------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return read_cache(make_synthetic_cache(tmp_path_factory.mktemp("pairs") / "s.h5"))


@pytest.fixture(scope="module")
def pairs_file(cache, tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pf") / "pairs.jsonl", cache.ids,
                       cache.labels[:, 0], 400)


def test_only_pairs_of_training_clips_train(cache, pairs_file):
    split = make_split(cache, HEADS, CFG)
    allowed = training_clips(cache, split.val, split.eval)
    assert not np.intersect1d(allowed, np.union1d(split.val, split.eval)).size
    joined = join_pairs(cache, pairs_file, allowed)
    assert joined.total == 400 and joined.not_in_cache == 0
    assert 0 < joined.held_out < 400 and len(joined.outcome) + joined.held_out == 400
    for rows in (joined.first, joined.second):  # no validation or eval clip trains
        assert np.isin(rows, allowed).all()
    rec = joined.record()
    assert rec["training_pairs"] == len(joined.outcome) and len(rec["sha256"]) == 64
    # a file whose every pair touches an eval clip trains nothing: refused
    only_eval = write_pairs(pairs_file.with_name("eval.jsonl"), cache.ids, cache.labels[:, 0],
                            50, rows=split.eval)
    with pytest.raises(QamroError, match="no pair has both clips among the training clips"):
        train(cache, HEADS, [Member(LossConfig(pair_weight=1.0), 0)],
              replace(CFG, pairs=str(only_eval)))


def test_bad_pairs_are_one_line(cache, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"audio_a": "x/clip0001.wav", "audio_b": "x/clip0001.wav",
                             "winner": "A"}) + "\n")
    with pytest.raises(QamroError, match="item 1: clip A and clip B are the same file"):
        read_pairs(f, labelled=True)
    f.write_text(json.dumps({"audio_a": "x/clip0001.wav", "audio_b": "y/clip0001.flac",
                             "winner": "A"}) + "\n")
    with pytest.raises(QamroError, match="the same clip of the cache"):
        join_pairs(cache, f, np.arange(len(cache.ids)))
    f.write_text(json.dumps({"audio_a": "x/nope.wav", "audio_b": "y/other.wav",
                             "winner": "B"}) + "\n")
    with pytest.raises(QamroError, match="none of its 1 pairs joins the cache"):
        join_pairs(cache, f, np.arange(len(cache.ids)))
    with pytest.raises(QamroError, match="give them with --pairs FILE"):
        train(cache, HEADS, [Member(LossConfig(pair_weight=1.0), 0)], CFG)


def test_window_level_caches_are_refused(tmp_path):
    c = read_cache(per_layer_cache(tmp_path / "w.h5"))
    recipe = small_recipe(tmp_path)
    f = write_pairs(tmp_path / "p.jsonl", c.ids, c.labels[:, 0], 20)
    with pytest.raises(QamroError, match="per-window features"):
        train(c, recipe.heads, [Member(LossConfig(pair_weight=1.0), 0)],
              replace(CFG, pairs=str(f), max_epochs=2))


# -- training --------------------------------------------------------------------------------
def test_members_stay_independent_in_one_run(cache, pairs_file):
    cfg = replace(CFG, pairs=str(pairs_file))
    members = [Member(LossConfig(), 0), Member(LossConfig(pair_weight=1.0), 0),
               Member(LossConfig(kind="none", pair_weight=0.5), 1)]
    together = train(cache, HEADS, members, cfg)
    for k, m in enumerate(members):
        alone = train(cache, HEADS, [m], cfg if m.loss.pair_weight else CFG)
        assert together.best_epoch[k] == alone.best_epoch[0]
        for h in together.predictions:
            assert np.allclose(together.predictions[h][k], alone.predictions[h][0], atol=1e-5)
    # the pairs change training: the same member without them is another model
    assert not np.allclose(together.predictions["overall"][0],
                           together.predictions["overall"][1], atol=1e-3)
    assert member_label(members[1].loss, 0) == "qamro a=0.2 b=7 +pairs 1 seed=0"
    assert loss_part(members[1:2], LossConfig()) == "qamro-a0.2-b7-pairs1"


def test_resumed_run_equals_the_uninterrupted_one(cache, pairs_file, tmp_path):
    members = [Member(LossConfig(pair_weight=1.0), 0), Member(LossConfig(kind="none"), 1)]
    whole, _, resumed = stopped_then_resumed(cache, HEADS, members,
                                             replace(CFG, pairs=str(pairs_file)),
                                             tmp_path / "state.safetensors")
    assert resumed.best_epoch == whole.best_epoch
    for h in whole.predictions:
        assert np.array_equal(resumed.predictions[h], whole.predictions[h])
    assert np.array_equal(resumed.history, whole.history)


def test_pairs_move_the_heads_the_right_way_where_labels_are_scarce(tmp_path):
    """Most training clips without a MOS label, pairs among them: the member with pairs
    orders held-out pairs better than the same member trained on the few labels alone."""
    path = make_synthetic_cache(tmp_path / "s.h5", n_systems=12, per_system=30, seed=3)
    full = read_cache(path)
    score = full.labels[:, 0].copy()
    train_rows = full.rows("train")
    rng = np.random.default_rng(0)
    hidden = rng.choice(train_rows, int(0.95 * len(train_rows)), replace=False)
    labels = full.labels.copy()
    labels[hidden] = NAN
    scarce = replace(full, labels=labels)
    f = write_pairs(tmp_path / "p.jsonl", full.ids, score, 1500, rows=train_rows)
    held = write_pairs(tmp_path / "held.jsonl", full.ids, score, 400, seed=1,
                       rows=full.rows("dev"))
    heads = HEADS[:1]
    cfg = replace(CFG, pairs=str(f), max_epochs=60, patience=10)
    res = train(scarce, heads, [Member(LossConfig(), s) for s in (0, 1)]
                + [Member(LossConfig(pair_weight=1.0), s) for s in (0, 1)], cfg)
    ids = {c: i for i, c in enumerate(full.ids)}
    pairs = [p for p in read_pairs(held, labelled=True) if p.winner != "tie"]
    a = np.array([ids[p.audio_a.stem] for p in pairs])
    b = np.array([ids[p.audio_b.stem] for p in pairs])
    won = np.array([p.winner == "A" for p in pairs])
    pred = res.predictions["overall"]  # [K, N]
    acc = [float(np.mean((pred[k, a] > pred[k, b]) == won)) for k in range(4)]
    assert min(acc[2:]) > max(acc[:2]), acc


def test_cli_trains_on_pairs_and_records_them(tmp_path):
    from qamro_pipe.train.resume import fingerprint

    from kit.cli import invoke

    path = make_synthetic_cache(tmp_path / "s.h5")
    c = read_cache(path)
    f = write_pairs(tmp_path / "pairs.jsonl", c.ids, c.labels[:, 0], 200)
    out = tmp_path / "run"
    r = invoke("train", "--cache", path, "--out", out, "--quiet", "--max-epochs", "4",
               "--pairs", f)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["members"][0]["loss"]["pair_weight"] == 1.0  # the default with --pairs
    assert config["train"]["pairs"] == str(f) and config["pairs"]["pairs"] == 200
    held = config["pairs"]
    assert held["training_pairs"] + held["validation_pairs"] + \
        held["left_out_held_out_clips"] == 200
    # a tenth of the joined pairs (val_fraction) validate: early stopping reads them
    assert held["validation_pairs"] == round(0.1 * (200 - held["left_out_held_out_clips"]))
    assert "+pairs 1" in metrics["members"][0]["member"]
    assert "pairs of pairs.jsonl train" in r.output
    # the file's contents are in the resume fingerprint, not its place
    cfg = TrainConfig(pairs=str(f))
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(f.read_bytes())
    fp = fingerprint(c, HEADS, [Member()], cfg, None)
    assert fingerprint(c, HEADS, [Member()], replace(cfg, pairs=str(copy)), None) == fp
    write_pairs(f, c.ids, c.labels[:, 0], 200, seed=5)
    assert fingerprint(c, HEADS, [Member()], cfg, None) != fp
    # refusals: one line, exit 1, nothing written
    for args, msg in ((["--pairs", tmp_path / "none.jsonl"], "no such pairs file"),
                      (["--pair-weight", "1"], "give them with --pairs FILE"),
                      (["--pairs", f, "--pair-head", "nope"], "--pair-head nope"),
                      (["--pairs", f, "--pair-weight", "-1"], "--pair-weight -1")):
        r = invoke("train", "--cache", path, "--out", tmp_path / "no", "--quiet", *args)
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "no").exists()


def test_the_demo_corpus_pairs_in_ours_and_cmi_rewardbench_layouts(tmp_path):
    """The demo corpus's pairs.jsonl (its simulated raters judging two systems' clips of one
    prompt from their true scores: qamro_pipe/extract/datasets/demo.py), and the same pairs in
    CMI-RewardBench's field names (Haiwen-Xia/CMI-RewardBench data files: `prompt`,
    `audio-path`, `audio2`, `preference` model_a / model_b / both), join the melstats cache
    by the files it was extracted from, and train: the dev clips are then ordered as their
    MOS labels order them far better than by chance."""
    from qamro_pipe.config import ExtractConfig
    from qamro_pipe.extract.datasets import load_dataset
    from qamro_pipe.extract.loop import extract

    recs = load_dataset("demo", tmp_path / "corpus", n_systems=12, n_prompts=10, seconds=1.0)
    path = tmp_path / "melstats.h5"
    extract(recs, ExtractConfig(backbone="melstats", device="cpu", workers=0), path,
            progress=False)
    c = read_cache(path)
    ours = tmp_path / "corpus" / "pairs.jsonl"
    items = [json.loads(x) for x in ours.read_text().splitlines()]
    assert len(items) == 10 * 40 and {x["winner"] for x in items} <= {"A", "B", "tie"}
    cmi = tmp_path / "corpus" / "cmi.jsonl"
    to_cmi = {"A": "model_a", "B": "model_b", "tie": "both"}
    cmi.write_text("".join(json.dumps({"prompt": x["prompt"], "audio-path": x["audio_a"],
                                       "audio2": x["audio_b"], "lyrics": "",
                                       "preference": to_cmi[x["winner"]]}) + "\n"
                           for x in items))
    everything = np.arange(len(c.ids))
    a, b = join_pairs(c, ours, everything), join_pairs(c, cmi, everything)
    assert a.not_in_cache == 0 and len(a.outcome) == 400
    assert np.array_equal(a.first, b.first) and np.array_equal(a.outcome, b.outcome)
    # joined by the source path the cache records: clip ids that are not the file stems
    renamed = replace(c, ids=np.array([f"clip{i}" for i in range(len(c.ids))], dtype=object))
    assert np.array_equal(join_pairs(renamed, ours, everything).second, a.second)
    with pytest.raises(QamroError, match="none of its 400 pairs joins the cache"):
        join_pairs(replace(renamed, sources=None), ours, everything)
    heads = HEADS[:1]
    cfg = replace(CFG, pairs=str(cmi), max_epochs=40, patience=10, batch_size=32)
    res = train(c, heads, [Member(LossConfig(pair_weight=1.0), 0)], cfg)
    ev = make_split(c, heads, cfg).eval  # held out: every pair of two dev clips, the
    # higher MOS label its winner
    i, j = np.triu_indices(len(ev), 1)
    y, pred = c.labels[ev, 0], res.predictions["overall"][0][ev]
    decided = y[i] != y[j]
    acc = np.mean((pred[i] > pred[j])[decided] == (y[i] > y[j])[decided])
    assert decided.sum() >= 100 and acc > 0.7, (decided.sum(), acc)


def test_a_pairs_file_is_checked_before_torch_is_imported(tmp_path):
    """The process is the point: a missing pairs file, or one none of whose pairs joins the
    --cache, is answered with torch, scipy and sklearn never imported."""
    import subprocess
    import sys

    light = ("import sys; from typer.testing import CliRunner; from qamro_pipe.cli import app; "
             "r = CliRunner().invoke(app, sys.argv[1:]); "
             "heavy = sorted(m for m in ('torch', 'scipy', 'sklearn') if m in sys.modules); "
             "print(r.exit_code, ','.join(heavy) or 'none'); print(r.output)")
    path = make_synthetic_cache(tmp_path / "s.h5", n_systems=2, per_system=4)
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"audio_a": "a.wav", "audio_b": "b.wav", "winner": "A"}) + "\n")
    for pairs, msg in ((tmp_path / "none.jsonl", "no such pairs file"),
                       (f, "none of its 1 pairs joins the cache")):
        r = subprocess.run([sys.executable, "-c", light, "train", "--cache", str(path),
                            "--pairs", str(pairs)], capture_output=True, text=True)
        first, output = r.stdout.split("\n", 1)
        assert first == "1 none" and msg in output, r.stdout + r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replay_equals_eager_with_pairs(cache, pairs_file):
    """Each member's pair draws are made on the device inside the captured epoch: a replayed
    graph trains as the eager loop does."""
    members = [Member(LossConfig(pair_weight=1.0), 0), Member(LossConfig(), 1)]
    cfg = replace(CFG, device="cuda", pairs=str(pairs_file))
    eager = train(cache, HEADS, members, replace(cfg, cuda_graph=False))
    graph = train(cache, HEADS, members, replace(cfg, cuda_graph=True))
    assert eager.best_epoch == graph.best_epoch
    for h in eager.predictions:
        np.testing.assert_allclose(graph.predictions[h], eager.predictions[h], rtol=1e-5,
                                   atol=1e-5)


# -- pairs alone -----------------------------------------------------------------------------
def test_a_member_trains_on_pairs_alone_and_stops_on_held_out_pairs(tmp_path):
    """--regression-weight 0 with --pair-weight: no MOS term at all in the member's
    objective; it early-stops on the validation pairs (a tenth of the joined pairs, held out
    of training), and its scores order the eval clips as the labels do (on its own scale:
    the pairs fix differences, not a level). Beside members with MOS labels in one run, it
    trains as it does alone."""
    path = make_synthetic_cache(tmp_path / "s.h5", n_systems=12, per_system=30, seed=3)
    data = read_cache(path)
    f = write_pairs(tmp_path / "p.jsonl", data.ids, data.labels[:, 0], 3000)
    cfg = replace(CFG, pairs=str(f), max_epochs=200, patience=15)
    alone = Member(LossConfig(kind="none", pair_weight=1.0, regression_weight=0.0), 0)
    res = train(data, HEADS[:1], [alone, Member(LossConfig(), 0)], cfg)
    ev = res.split.eval
    srcc = float(stats_spearman(res.predictions["overall"][0][ev], data.labels[ev, 0]))
    assert srcc > 0.6, srcc
    assert 1 < res.best_epoch[0] < res.stopped_epoch[0] < cfg.max_epochs  # it early-stopped
    hist = res.history[res.history[:, 0] == 0]
    assert np.all(hist[:, 5] == 0)  # train_reg: no regression term (HISTORY_COLUMNS)
    one = train(data, HEADS[:1], [alone], cfg)
    assert one.best_epoch[0] == res.best_epoch[0]
    assert np.allclose(one.predictions["overall"][0], res.predictions["overall"][0], atol=1e-5)
    assert member_label(alone.loss, 0) == "none regression×0 +pairs 1 seed=0"


def test_the_validation_pairs_term_is_the_literal_one():
    """PairTerm.validate: w_k * L_BT over every validation pair, mean over the heads (the
    ones the pairs do not train add 0), against losses_reference's pair-by-pair loss."""
    from qamro_pipe.train.pairs_term import PairRows, PairTerm

    g = torch.Generator().manual_seed(0)
    rows = PairRows([0, 2, 4, 1], [1, 3, 0, 4], [1.0, 0.0, 0.5, 1.0], [True, False], "cpu")
    members = [Member(LossConfig(pair_weight=w), 0) for w in (0.0, 1.0, 2.5)]
    term = PairTerm(rows, members, 3, "cpu")
    outs = [torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)]
    got = term.validate(rows, lambda r: [o[:, r] for o in outs])
    for k, w in enumerate((0.0, 1.0, 2.5)):
        o = outs[0][k].double()
        want = w * bradley_terry_loss_literal(o[rows.first], o[rows.second],
                                              rows.outcome.double()) / 2
        assert float(got[k]) == pytest.approx(float(want), rel=1e-5, abs=1e-7)


def test_regression_weight_refusals():
    with pytest.raises(QamroError, match="nothing to train"):
        LossConfig(kind="none", regression_weight=0.0)
    with pytest.raises(QamroError, match="no regression term to weigh"):
        LossConfig(regression_weight=0.0, loss_weighting="uncertainty")
    with pytest.raises(QamroError, match="regression_weight|--regression-weight"):
        LossConfig(regression_weight=-1.0)


def stats_spearman(a, b):
    from scipy import stats

    return stats.spearmanr(a, b)[0]
