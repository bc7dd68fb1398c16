"""CUDA-only checks: the graph-captured trainer gives the eager trainer's numbers.

Skipped where there is no GPU (CI); run on a lent GPU by benchmarks/gpu.sh."""
import numpy as np
import pytest
import torch

from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.store.reader import read_cache
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.shuffle import member_permutations
from qamro_pipe.train.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HEADS = (HeadSpec("overall", "overall", ("audio",)),
         HeadSpec("textual", "textual", ("audio", "text")))
MEMBERS = [Member(LossConfig(beta=b), s) for b in (1.0, 7.0) for s in (0, 1)]


def test_permutations_identical_on_cpu_and_gpu():
    seeds = torch.tensor([3, 5, 1 << 60])
    assert torch.equal(member_permutations(seeds, 7, 1000),
                       member_permutations(seeds.cuda(), torch.tensor(7).cuda(), 1000).cpu())


def test_graph_replay_equals_eager(synthetic_cache):
    cache = read_cache(synthetic_cache)
    base = dict(max_epochs=80, patience=15, bootstrap=0, device="cuda", check_every=1)
    eager = train(cache, HEADS, MEMBERS, TrainConfig(cuda_graph=False, **base))
    graph = train(cache, HEADS, MEMBERS, TrainConfig(cuda_graph=True, **base))
    assert eager.best_epoch == graph.best_epoch
    assert eager.stopped_epoch == graph.stopped_epoch
    for h in eager.predictions:
        np.testing.assert_allclose(graph.predictions[h], eager.predictions[h], rtol=1e-5,
                                   atol=1e-5)


def test_same_seed_same_numbers_on_gpu_and_close_to_cpu(synthetic_cache):
    cache = read_cache(synthetic_cache)
    cfg = dict(max_epochs=60, patience=1000, bootstrap=0)
    a = train(cache, HEADS, MEMBERS, TrainConfig(device="cuda", **cfg))
    b = train(cache, HEADS, MEMBERS, TrainConfig(device="cuda", **cfg))
    c = train(cache, HEADS, MEMBERS, TrainConfig(device="cpu", **cfg))
    for h in a.predictions:
        np.testing.assert_allclose(a.predictions[h], b.predictions[h], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a.predictions[h], c.predictions[h], rtol=1e-3, atol=1e-3)


def test_sweep_member_equals_single_run_on_gpu(synthetic_cache):
    cache = read_cache(synthetic_cache)
    cfg = TrainConfig(max_epochs=60, bootstrap=0, device="cuda")
    sweep = train(cache, HEADS, MEMBERS, cfg)
    single = train(cache, HEADS, [MEMBERS[3]], cfg)
    for h in sweep.predictions:
        np.testing.assert_allclose(sweep.predictions[h][3], single.predictions[h][0], rtol=1e-4,
                                   atol=1e-5)


def test_tf32_matmuls_stay_within_tolerance(synthetic_cache):
    """The figures behind `matmul_precision="high"`: TF32 moves predictions by well under the
    labels' 0.2 step and leaves system-level ranking metrics where they were."""
    from qamro_pipe.train.runs import summarise

    cache = read_cache(synthetic_cache)
    base = dict(max_epochs=200, patience=20, bootstrap=0, device="cuda")
    fp32 = train(cache, HEADS, MEMBERS, TrainConfig(matmul_precision="highest", **base))
    tf32 = train(cache, HEADS, MEMBERS, TrainConfig(matmul_precision="high", **base))
    assert torch.get_float32_matmul_precision() == "highest"  # restored after the call
    for h in fp32.predictions:
        diff = np.abs(fp32.predictions[h] - tf32.predictions[h]).max()
        print(f"TF32 vs fp32 max |prediction difference| {h}: {diff:.2e}")
        assert diff < 0.05
    m1 = summarise(cache, fp32, TrainConfig(bootstrap=0))
    m2 = summarise(cache, tf32, TrainConfig(bootstrap=0))
    for h in m1["heads"]:
        d = abs(m1["heads"][h]["system"]["srcc"] - m2["heads"][h]["system"]["srcc"])
        print(f"TF32 vs fp32 |system SRCC difference| {h}: {d:.3f}")
        assert d <= 0.03


def test_backbone_batches_prepared_on_the_gpu_equal_the_cpu_ones():
    """Pinned buffers, async uploads and on-device quantising give the CPU's very bits, for
    every int16 level too (CUDA once divided by 32767 as a multiplication by 1/32767)."""
    from qamro_pipe.extract.backbones.aesthetics import pad_and_mask
    from qamro_pipe.extract.backbones.clap import quantize_int16, stack_windows

    rng = np.random.default_rng(0)
    levels = np.arange(-32768, 32768, dtype=np.float32) / 32767.0  # every int16 level
    wins = [rng.uniform(-1.3, 1.3, n).astype(np.float32) for n in (48000, 7001, 24000)]
    wins.append(np.concatenate([levels, rng.uniform(-1.3, 1.3, 48000 - len(levels))]).astype(
        np.float32))
    for _ in range(3):  # pinned blocks are reused: later batches must not see stale data
        cpu = quantize_int16(stack_windows(wins, 48000, "cpu"))
        gpu = quantize_int16(stack_windows(wins, 48000, "cuda"))
        assert torch.equal(cpu, gpu.cpu())
        (w_cpu, m_cpu), (w_gpu, m_gpu) = (pad_and_mask(wins, 48000, d) for d in ("cpu", "cuda"))
        assert torch.equal(w_cpu, w_gpu.cpu()) and torch.equal(m_cpu, m_gpu.cpu())
        wins = [w[::-1].copy() for w in wins]


def test_pipelined_gpu_extraction_equals_the_cpu_cache(tmp_path):
    """On a GPU, features come back through pinned memory and events while the next batch is
    launched: batches in flight give what one batch at a time gives, whatever happens to
    their input afterwards, and a pipelined extract equals the CPU's cache."""
    from qamro_pipe.config import ExtractConfig
    from qamro_pipe.extract.backbones import get_backbone
    from qamro_pipe.extract.datasets import load_dataset
    from qamro_pipe.extract.loop import extract

    from kit.backbones import check_launched_batches, write_roberta_style_tokenizer

    tok = str(write_roberta_style_tokenizer(tmp_path / "tokenizer"))
    bb, on_cpu = (get_backbone("clap-music", checkpoint="random", device=d, offline=True,
                               tokenizer_dir=tok) for d in ("cuda", "cpu"))
    texts = ["a song", "a calm piano piece with soft strings"]
    np.testing.assert_allclose(bb.embed_texts(texts)["text"], on_cpu.embed_texts(texts)["text"],
                               atol=1e-4)  # tokens reach the device by a pinned, async copy
    check_launched_batches(bb, (9000, 48000, 480000), 4, atol=1e-5, seed=0)
    records = load_dataset("demo", tmp_path / "corpus", n_systems=4, n_prompts=5, seconds=3.0)
    caches = {}
    flags = [torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision]
    for device in ("cpu", "cuda"):
        cfg = ExtractConfig(backbone="aesthetics", checkpoint="random", device=device,
                            batch_size=4, workers=2, offline=True)
        extract(records, cfg, tmp_path / f"{device}.h5", progress=False)
        caches[device] = read_cache(tmp_path / f"{device}.h5")
    cpu, gpu = caches["cpu"], caches["cuda"]
    assert cpu.windows.keys() == gpu.windows.keys() == {"layers"}
    assert np.array_equal(cpu.window_offsets, gpu.window_offsets)
    assert np.array_equal(cpu.window_weight, gpu.window_weight)
    # fp32 is fp32: with cuDNN's TF32 convolutions (torch's default) 18 of 199,680 values
    # were up to 1.3e-3 apart; without, what is left is summation order
    diff = np.abs(gpu.windows["layers"] - cpu.windows["layers"]).max()
    print(f"aesthetics fp32, GPU vs CPU max |difference|: {diff:.2e}")
    np.testing.assert_allclose(gpu.windows["layers"], cpu.windows["layers"], rtol=1e-4,
                               atol=1e-4)
    assert [torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.conv.fp32_precision] == flags  # the caller's, restored



def test_adamw_and_members_leaving_the_batch_under_graph_replay(synthetic_cache):
    """AdamW's step counts live on the device (capturable), so a replayed graph steps it;
    members that stop leave the batch (a new engine, a new capture) without changing the
    others' numbers beyond rounding."""
    cache = read_cache(synthetic_cache)
    for opt in (dict(), dict(optimizer="adamw", lr=2e-3, weight_decay=0.01)):
        base = dict(max_epochs=70, patience=6, lr=0.02, bootstrap=0, device="cuda",
                    check_every=1)
        base.update(opt)
        eager = train(cache, HEADS, MEMBERS, TrainConfig(cuda_graph=False, **base))
        graph = train(cache, HEADS, MEMBERS, TrainConfig(**base))
        kept = train(cache, HEADS, MEMBERS, TrainConfig(compact=False, **base))
        assert len(set(graph.stopped_epoch)) > 1, graph.stopped_epoch
        assert eager.stopped_epoch == graph.stopped_epoch == kept.stopped_epoch
        assert graph.member_epochs < kept.member_epochs
        for h in eager.predictions:
            np.testing.assert_allclose(graph.predictions[h], eager.predictions[h], rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_allclose(graph.predictions[h], kept.predictions[h], rtol=1e-4,
                                       atol=1e-5)


def test_resumed_run_on_gpu_equals_the_uninterrupted_one(synthetic_cache, tmp_path):
    """Saved on the GPU, resumed on the GPU: the same numbers as one uninterrupted run."""
    from dataclasses import replace

    from qamro_pipe.train.state import TrainState
    from qamro_pipe.train.trainer import Checkpoint

    from kit.resume import Stop, stop_at

    cache = read_cache(synthetic_cache)
    cfg = TrainConfig(max_epochs=70, patience=6, lr=0.02, bootstrap=0, device="cuda",
                      checkpoint_seconds=0.0)
    whole = train(cache, HEADS, MEMBERS, cfg)
    ckpt = Checkpoint(tmp_path / "state.safetensors", "fp", every=0.0)
    with pytest.raises(Stop):
        train(cache, HEADS, MEMBERS, cfg, progress=stop_at(whole.epochs_run // 2),
              checkpoint=ckpt)
    saved, _ = TrainState.load(ckpt.path)
    resumed = train(cache, HEADS, MEMBERS, cfg, checkpoint=replace(ckpt, resume=saved))
    assert resumed.stopped_epoch == whole.stopped_epoch
    for h in whole.predictions:
        np.testing.assert_allclose(resumed.predictions[h], whole.predictions[h], rtol=1e-6,
                                   atol=1e-6)


# issue 15: the listwise and distributional losses as members on the GPU
MIXED = [Member(LossConfig(), 0), Member(LossConfig(kind="listnet", temperature=0.5), 0),
         Member(LossConfig(kind="listmle"), 1), Member(LossConfig(kind="spearman", tau=0.2), 0),
         Member(LossConfig(kind="gaussian-kl", label_range=(1.0, 5.0)), 0)]


def test_mixed_loss_kinds_graph_replay_equals_eager_and_cpu(synthetic_cache):
    cache = read_cache(synthetic_cache)
    base = dict(max_epochs=60, patience=15, bootstrap=0, check_every=1)
    eager = train(cache, HEADS, MIXED, TrainConfig(device="cuda", cuda_graph=False, **base))
    graph = train(cache, HEADS, MIXED, TrainConfig(device="cuda", cuda_graph=True, **base))
    cpu = train(cache, HEADS, MIXED, TrainConfig(device="cpu", **base))
    assert eager.best_epoch == graph.best_epoch and not graph.failures
    for h in eager.predictions:
        np.testing.assert_allclose(graph.predictions[h], eager.predictions[h], rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(graph.predictions[h], cpu.predictions[h], rtol=1e-3,
                                   atol=1e-3)


def test_listwise_losses_match_their_references_on_the_gpu():
    from qamro_pipe.train.distribution import gaussian_kl_loss
    from qamro_pipe.train.listwise import listmle_loss, listnet_loss, spearman_loss

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 40, generator=g, dtype=torch.float64)
    target = (torch.randint(5, 26, (3, 40), generator=g) / 5).double()
    target[:, ::7] = float("nan")
    logits = torch.randn(3, 40, 21, generator=g, dtype=torch.float64)
    for fn, x in ((listnet_loss, pred), (listmle_loss, pred), (spearman_loss, pred),
                  (gaussian_kl_loss, logits)):
        a, b = x.clone().requires_grad_(), x.cuda().requires_grad_()
        la, lb = fn(a, target), fn(b, target.cuda())
        la.sum().backward()
        lb.sum().backward()
        torch.testing.assert_close(lb.cpu(), la, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-9, atol=1e-12)
