"""clap-music against laion_clap's own code: random weights, a checkpoint saved the way the
released ones were, the roberta-base tokenizer and configuration; no download, no mocks."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy  # noqa: E402
import json  # noqa: E402
import pickletools  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qamro_pipe.errors import QamroError  # noqa: E402
from qamro_pipe.extract.backbones import get_backbone  # noqa: E402
from qamro_pipe.extract.backbones.base import RANDOM_WEIGHTS, sha256_file  # noqa: E402

from kit.backbones import (  # noqa: E402
    check_launched_batches,
    cosine_distance,
    tone_mix,
    write_roberta_style_tokenizer,
)

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture
def no_tokenizer_anywhere(tmp_path, monkeypatch):
    """No roberta-base files in weights_dir() nor in the Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("QAMRO_HOME", str(tmp_path / "qamro-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def reference_clap_module(backbone):
    """laion_clap's own CLAP_Module around our model: its __init__ would download
    roberta-base, so it is set up by hand with the attributes its methods read."""
    import torch
    from laion_clap import CLAP_Module

    m = CLAP_Module.__new__(CLAP_Module)
    torch.nn.Module.__init__(m)
    m.enable_fusion = False
    m.model = backbone.model
    m.model_cfg = backbone.model_cfg
    m.tokenize = backbone.ensure_tokenizer()
    return m


def laion_clap_embeddings(backbone, clips, texts):
    """(audio [N, 512], text [M, 512]) from CLAP_Module's public methods, clip by clip."""
    import torch

    ref = reference_clap_module(backbone)
    with torch.no_grad():
        audio = [ref.get_audio_embedding_from_data(x=[c], use_tensor=False)[0] for c in clips]
        return np.array(audio), ref.get_text_embedding(texts)


def test_clap_audio_matches_laion_clap(clap):
    rng = np.random.default_rng(1)
    sr = clap.sample_rate
    clips = [tone_mix(sr, 3.0) + 0.01 * rng.standard_normal(3 * sr).astype(np.float32),
             0.3 * rng.standard_normal(10 * sr).astype(np.float32)]
    ours = clap.embed_windows(clips)["audio"]
    assert ours.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, rtol=1e-5)
    expected, _ = laion_clap_embeddings(clap, clips, ["a song"])
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert cosine_distance(ours[0], ours[1]) > 1e-3  # the audio reaches the output


def test_clap_window_preparation_is_laion_clap_s_bit_for_bit(clap):
    """Our torch quantise-and-pad equals laion_clap's numpy int16 round trip followed by its
    own repeatpad filling, exactly, for every int16 level and for short and full windows."""
    import torch
    from laion_clap.training.data import float32_to_int16, get_audio_features, int16_to_float32

    from qamro_pipe.extract.backbones.clap import quantize_int16, stack_windows

    rng = np.random.default_rng(2)
    n = clap.window_samples
    levels = np.arange(-32768, 32768, dtype=np.float32) / 32767.0  # every level, and -1 - 1 ulp
    windows = [np.concatenate([levels, rng.uniform(-1.5, 1.5, n - len(levels))]).astype(
                   np.float32),
               rng.uniform(-1.2, 1.2, 7001).astype(np.float32),  # repeats, then zeros
               rng.standard_normal(n // 2).astype(np.float32)]  # exactly two repeats
    ours = quantize_int16(stack_windows(windows, n, "cpu")).numpy()
    for w, row in zip(windows, ours):
        q = torch.from_numpy(int16_to_float32(float32_to_int16(w))).float()
        ref = get_audio_features({}, q, n, data_truncating="rand_trunc",
                                 data_filling="repeatpad", audio_cfg=clap.model_cfg["audio_cfg"],
                                 require_grad=False)["waveform"].numpy()
        assert np.array_equal(row.view(np.int32), ref.view(np.int32))


def test_launched_batches_copy_their_windows_and_equal_one_at_a_time(clap):
    originals, expected = check_launched_batches(clap, (9000, 48000), 2, atol=1e-6)
    prepared = clap.prepare_windows(originals[1])  # what benchmarks time as the forward alone
    assert tuple(prepared.shape) == (2, clap.window_samples)
    np.testing.assert_allclose(clap.forward_prepared(prepared).result()["audio"], expected[1],
                               atol=1e-6)


def test_clap_text_matches_laion_clap(clap):
    texts = ["a song", "a calm piano piece with soft strings " * 20]  # second one truncates
    ours = clap.embed_texts(texts)["text"]
    assert ours.shape == (2, 512)
    _, expected = laion_clap_embeddings(clap, [], texts)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert clap.provenance()["checkpoint"] == RANDOM_WEIGHTS
    folder = Path(clap.tokenizer_dir)
    assert clap.provenance()["tokenizer_files"] == {
        f: sha256_file(folder / f) for f in ("vocab.json", "merges.txt")}


def test_clap_without_tokenizer_embeds_audio_and_says_what_text_needs(clap, tmp_path,
                                                                       no_tokenizer_anywhere):
    b = copy.copy(clap)
    b.tokenizer_dir, b.tokenizer, b._tokenizer_at, b._provenance = None, None, None, {}
    with pytest.raises(QamroError, match="--tokenizer-dir DIR") as err:
        b.embed_texts(["a song"])
    assert "offline" in str(err.value) and "audio-only extraction" in str(err.value)
    with pytest.raises(QamroError, match="text features need the roberta-base tokenizer"):
        b.identity(texts=True)  # before any work: extraction with texts stops at its key
    assert b.identity(texts=False) == {"weights": RANDOM_WEIGHTS}
    assert b.embed_windows([tone_mix(b.sample_rate, 1.0)])["audio"].shape == (1, 512)
    empty = tmp_path / "empty_tokenizer"
    empty.mkdir()
    b.tokenizer_dir, b._tokenizer_at = str(empty), None
    with pytest.raises(QamroError, match="5 tokens instead of 50265"):
        b.ensure_tokenizer()


def test_tokenizer_is_found_in_the_hugging_face_cache_at_the_pinned_revision(
        tmp_path, no_tokenizer_anywhere):
    """A snapshot laid out as huggingface_hub's cache keeps one (docs: "Manage
    huggingface_hub cache-system", models--ORG--NAME/snapshots/<commit>/<file>), found
    on disk, without the network; another revision's snapshot is not used."""
    import huggingface_hub.constants

    from qamro_pipe.extract.backbones.roberta_tokenizer import TOKENIZER, find_tokenizer

    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--FacebookAI--roberta-base"
    other = write_roberta_style_tokenizer(repo / "snapshots" / ("0" * 40))
    assert find_tokenizer(None, offline=True)[0] is None
    pinned = repo / "snapshots" / TOKENIZER.revision
    pinned.parent.mkdir(exist_ok=True)
    other.rename(pinned)
    assert find_tokenizer(None, offline=True) == (pinned, None)


def test_clap_checkpoint_keys_are_read_tolerantly(tmp_path):
    import torch

    from qamro_pipe.extract.backbones.clap import load_clap_weights

    model = torch.nn.ModuleDict({"text_branch": torch.nn.ModuleDict(
        {"embeddings": torch.nn.Linear(2, 2)})})
    state = {f"module.{k}": torch.full_like(v, 3.0) for k, v in model.state_dict().items()}
    state["module.text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    torch.save({"epoch": 15, "name": "music", "state_dict": state}, tmp_path / "ok.pt")
    load_clap_weights(model, tmp_path / "ok.pt")
    assert (model.text_branch.embeddings.weight == 3).all()
    del state["module.text_branch.embeddings.bias"]
    torch.save({"state_dict": state}, tmp_path / "partial.pt")
    with pytest.raises(QamroError, match="missing"):
        load_clap_weights(model, tmp_path / "partial.pt")


def test_text_tower_configuration_is_roberta_base_s_published_one(clap):
    """tests/fixtures/roberta-base/config.json is the config.json published at
    https://huggingface.co/FacebookAI/roberta-base (the repository laion_clap's
    RobertaModel.from_pretrained("roberta-base") reads), text found quoted verbatim in
    public code (e.g. a candle RoBERTa example's "model config.json" comment). A wrong
    layer_norm_eps or hidden_act would pass a strict state-dict load; this catches it."""
    from qamro_pipe.extract.backbones.clap import ROBERTA_BASE

    published = json.loads((FIXTURES / "roberta-base" / "config.json").read_text())
    assert {k: published.get(k, "absent") for k in ROBERTA_BASE} == ROBERTA_BASE
    built = clap.model.text_branch.config.to_dict()  # what the text tower was built with
    for k, v in published.items():
        if k != "architectures":  # which head class the file was saved from
            assert built[k] == v, k


# -- a checkpoint saved as the released ones were -------------------------------------------
# LAION-AI/CLAP's training writes epoch files whose pickle references exactly these globals;
# the Hugging Face file scanner lists them for lukewys/laion_clap's
# music_audioset_epoch_15_esc_90.14.pt
HUB_SCANNER_GLOBALS = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                       "torch.FloatStorage", "torch.LongStorage",
                       "numpy.core.multiarray.scalar", "numpy.dtype", "_codecs.encode"}


@pytest.fixture(scope="module")
def release_ckpt(clap, tmp_path_factory):
    """A checkpoint saved the way LAION-AI/CLAP saved music_audioset_epoch_15_esc_90.14.pt
    and the 630k-*.pt files: src/laion_clap/training/main.py, whose main() needs a dataset,
    so its saving steps are reproduced with laion_clap's own pieces. Arguments from
    training/params.py parse_args; the model wrapped as main.py's DistributedDataParallel
    wraps it (torch's DataParallel: the same `module.` names); the optimizer from
    clap_module/utils.py get_optimizer over main.py's two parameter groups; the learning rate
    set by training/scheduler.py cosine_lr at the last step of epoch 15, past the warmup,
    where it assigns a numpy float64; then {"epoch", "name", "state_dict", "optimizer"}
    saved with torch.save. text_branch.embeddings.position_ids is in the state dict as
    transformers < 4.31 saved it (laion_clap's factory.load_state_dict deletes that key,
    so the real files carry it). The optimizer state covers the two logit scales only: a
    full AdamW state would triple the file's 800 MB, with the same types pickled. The
    weights are the random ones moved by seeded noise, so loading them is visible."""
    import torch
    from laion_clap.training.params import parse_args
    from laion_clap.training.scheduler import cosine_lr

    get_optimizer = sys.modules["clap_module.utils"].get_optimizer  # as main.py imports it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["main.py", "--amodel", "HTSAT-base", "--tmodel", "roberta",
                                 "--epochs", "15", "--name", "music_audioset"])
        args = parse_args()
    model = copy.deepcopy(clap.model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    model = torch.nn.DataParallel(model)
    named = list(model.named_parameters())
    exclude = lambda n, p: (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n  # noqa: E731
                            or "logit_scale" in n)
    optimizer = get_optimizer(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": args.wd}],
        lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, momentum=args.momentum,
        optimizer_name=args.optimizer)
    batches_per_epoch = 1000
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, batches_per_epoch * args.epochs)
    scheduler(batches_per_epoch * args.epochs - 1)
    for n, p in named:
        p.grad = torch.zeros_like(p) if "logit_scale" in n else None
    optimizer.step()
    state = model.state_dict()
    state["module.text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    path = tmp_path_factory.mktemp("release") / "music_audioset_epoch_15_esc_90.14.pt"
    torch.save({"epoch": args.epochs, "name": args.name, "state_dict": state,
                "optimizer": optimizer.state_dict()}, path)
    assert type(optimizer.param_groups[0]["lr"]) is np.float64
    return path


@pytest.fixture(scope="module")
def release_clap(clap, release_ckpt):
    """The release file loaded by clap-music's own load(), into a copy of the `clap` model:
    build_clap is seeded, so a second build would give the same model, seconds later."""
    import qamro_pipe.extract.backbones.clap as clap_module

    b = get_backbone("clap-music", checkpoint=str(release_ckpt), offline=True,
                     tokenizer_dir=clap.tokenizer_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(clap_module, "build_clap",
                   lambda amodel: (copy.deepcopy(clap.model), clap.model_cfg))
        b.load()
    return b


def test_release_checkpoint_pickles_what_the_hub_scanner_lists(release_ckpt):
    import torch

    with zipfile.ZipFile(release_ckpt) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    found = {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data)
             if op.name == "GLOBAL"}
    assert found == HUB_SCANNER_GLOBALS
    with pytest.raises(Exception, match="numpy.core.multiarray.scalar"):
        torch.load(release_ckpt, weights_only=True)  # what refused every user's file


def test_release_checkpoint_features_equal_laion_clap_s(clap, release_clap, release_ckpt):
    """Loaded by us (weights_only, numpy scalars allowed), the file gives the features that
    laion_clap's own CLAP_Module.load_ckpt (an unrestricted torch.load, `module.` off,
    position_ids dropped) and get_audio_embedding_from_data / get_text_embedding give."""
    rng = np.random.default_rng(4)
    sr = clap.sample_rate
    clips = [tone_mix(sr, 4.0), 0.2 * rng.standard_normal(10 * sr).astype(np.float32)]
    texts = ["a song", "a calm piano piece"]
    ours = release_clap.embed_windows(clips)["audio"]
    ours_text = release_clap.embed_texts(texts)["text"]
    assert cosine_distance(ours[0], clap.embed_windows(clips[:1])["audio"][0]) > 1e-3
    twin = copy.copy(release_clap)  # laion_clap loads the file into a model of its own
    twin.model = copy.deepcopy(clap.model)
    reference_clap_module(twin).load_ckpt(str(release_ckpt), verbose=False)
    audio, text = laion_clap_embeddings(twin, clips, texts)
    np.testing.assert_allclose(ours, audio, atol=1e-5)
    np.testing.assert_allclose(ours_text, text, atol=1e-5)


def test_release_file_identity_and_provenance_name_its_sha256(clap, release_ckpt, tmp_path,
                                                              monkeypatch):
    """A release file found where downloads land (no --checkpoint) is keyed by its sha256,
    as is a file given with --checkpoint; the tokenizer files' sha256 go along with texts."""
    from qamro_pipe.extract.backbones.clap import RELEASE

    monkeypatch.setenv("QAMRO_HOME", str(tmp_path))
    RELEASE.local_path.parent.mkdir(parents=True)
    RELEASE.local_path.symlink_to(release_ckpt)
    b = get_backbone("clap-music", offline=True, tokenizer_dir=clap.tokenizer_dir)
    ident = b.identity(texts=True)
    assert ident["weights"] == f"sha256:{sha256_file(release_ckpt)}"
    prov = b.provenance()
    assert prov["checkpoint"] == RELEASE.filename
    assert prov["checkpoint_sha256"] == sha256_file(release_ckpt)
    assert set(prov["tokenizer_files"]) == {"vocab.json", "merges.txt"}
    assert ident["tokenizer"].startswith("sha256:")
    given = get_backbone("clap-music", checkpoint=str(release_ckpt), offline=True)
    assert given.identity() == {"weights": ident["weights"]}


def test_audio_only_extraction_needs_no_tokenizer(clap, release_clap, release_ckpt, tmp_path,
                                                  monkeypatch, no_tokenizer_anywhere):
    """The README's promise: a manifest without texts extracts offline with no tokenizer
    files anywhere, and the cache's key and provenance name the checkpoint's sha256. (The
    model is a copy of the one build_clap made for the `clap` fixture: build_clap is
    seeded, so a second build would give the same model, 40 s later.)"""
    import soundfile as sf

    import qamro_pipe.extract.backbones.clap as clap_module
    from qamro_pipe.config import ExtractConfig
    from qamro_pipe.extract.datasets import load_dataset
    from qamro_pipe.extract.loop import extract
    from qamro_pipe.store.reader import read_cache

    monkeypatch.setattr(clap_module, "build_clap",
                        lambda amodel: (copy.deepcopy(clap.model), clap.model_cfg))
    sr = clap.sample_rate
    clips = [tone_mix(sr, 2.0), tone_mix(sr, 3.5, seed=1)[::-1].copy()]
    for i, x in enumerate(clips):
        sf.write(tmp_path / f"c{i}.wav", x, sr, subtype="FLOAT")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path,score\nc0,c0.wav,3\nc1,c1.wav,4\n")
    cfg = ExtractConfig(backbone="clap-music", checkpoint=str(release_ckpt), device="cpu",
                        workers=0, offline=True)
    extract(load_dataset("manifest", manifest), cfg, tmp_path / "c.h5", progress=False)
    cache = read_cache(tmp_path / "c.h5")
    assert set(cache.features) == {"audio"}
    np.testing.assert_allclose(cache.features["audio"],
                               release_clap.embed_windows(clips)["audio"], atol=1e-5)
    key, prov = cache.meta.key, cache.meta.config["provenance"]
    assert key["weights"] == f"sha256:{sha256_file(release_ckpt)}" and "tokenizer" not in key
    assert prov["checkpoint_sha256"] == sha256_file(release_ckpt)


def test_published_input_is_the_published_code_s(clap, release_clap, release_ckpt, tmp_path,
                                                 monkeypatch):
    """--clap-input published equals what the published track 1 code feeds CLAP
    (JethroWangSir/QAMRO track1/mos_track1.py: `torchaudio.load(wavpath)[0]`, cut to its
    first 480,000 samples, `wavs.squeeze(1)`, then `get_audio_embedding_from_data(wavs,
    use_tensor=True)`; NKU-HLT/MusicEval-baseline does the same), for a clip alone in its
    batch: 16 kHz PCM_16 files as MusicEval's, one longer than 30 s (cut) and one shorter
    (laion_clap repeat-pads it). Its cache has its own key and default file, so it is never
    served for the resampled input."""
    from dataclasses import replace

    import soundfile as sf
    import torch

    import qamro_pipe.extract.backbones.clap as clap_module
    from qamro_pipe.config import ExtractConfig
    from qamro_pipe.extract.datasets import load_dataset
    from qamro_pipe.extract.loop import default_cache_path, extract
    from qamro_pipe.store.reader import read_cache

    monkeypatch.setattr(clap_module, "build_clap",
                        lambda amodel: (copy.deepcopy(clap.model), clap.model_cfg))
    rng = np.random.default_rng(5)
    sr = 16000
    clips = [tone_mix(sr, 35.0, seed=2), 0.3 * rng.standard_normal(12 * sr)]
    for i, x in enumerate(clips):
        sf.write(tmp_path / f"c{i}.wav", np.clip(x, -1, 1), sr, subtype="PCM_16")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path,score\nc0,c0.wav,3\nc1,c1.wav,4\n")
    cfg = ExtractConfig(backbone="clap-music", checkpoint=str(release_ckpt), device="cpu",
                        workers=0, offline=True)
    records = load_dataset("manifest", manifest)
    extract(records, replace(cfg, clap_input="published"), tmp_path / "pub.h5",
            progress=False)
    extract(records, cfg, tmp_path / "res.h5", progress=False)
    pub, res = read_cache(tmp_path / "pub.h5"), read_cache(tmp_path / "res.h5")

    ref = reference_clap_module(release_clap)
    expected = []
    for i in range(2):
        # torchaudio.load(path)[0]: [channels, T] float32, PCM_16 as int16 / 32768; torchaudio
        # >= 2.9 decodes through torchcodec, not installed here, so soundfile reads it so
        data, _ = sf.read(tmp_path / f"c{i}.wav", dtype="float32", always_2d=True)
        wav = torch.from_numpy(data.T.copy())
        if wav.size(1) > 480000:
            wav = wav[:, :480000]
        wavs = torch.stack([wav]).squeeze(1)  # the published collate_fn and training loop
        with torch.no_grad():
            expected.append(ref.get_audio_embedding_from_data(wavs, use_tensor=True)[0].numpy())
    np.testing.assert_allclose(pub.features["audio"], np.array(expected), atol=1e-5)
    assert cosine_distance(pub.features["audio"][0], res.features["audio"][0]) > 1e-3
    assert pub.meta.key != res.meta.key and pub.meta.key["audio_input"] == "published"
    assert default_cache_path("musiceval", "clap-music", audio_input="published") != \
        default_cache_path("musiceval", "clap-music")
