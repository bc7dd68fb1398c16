"""Test audio, the tokenizer stand-in and the batches-in-flight check shared by the neural
backbones' tests (and benchmarks/), and the random-weight backbones the session builds once."""
import json

import numpy as np


def tone_mix(sr, seconds, seed=0):
    t = np.arange(int(sr * seconds)) / sr
    x = sum(a * np.sin(2 * np.pi * f * t + p) for a, f, p in
            [(0.25, 220, 0.0), (0.15, 660, 1.0), (0.1, 1500, 2.0), (0.06, 3500, 0.5),
             (0.04, 6000, 1.5)])
    return (x * (1 + 0.2 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)  # slow tremolo


def cosine_distance(a, b):
    return 1 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def write_roberta_style_tokenizer(folder):
    """A byte-level BPE tokenizer laid out like roberta-base's (50,265 ids, specials where
    roberta-base has them) with made-up merges: the real files cannot be fetched offline."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    byte_chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *byte_chars, "Ġs", "on", "Ġson", "Ġa"]
    tokens += [f"filler{i}" for i in range(50264 - len(tokens))] + ["<mask>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nĠ s\no n\nĠs on\nĠ a\n")
    return folder


def check_launched_batches(bb, sizes, n_batches, atol, seed=3):
    """Extraction launches batch N+1 before collecting batch N and lets the decoder reuse a
    batch's audio as soon as it is launched: batches in flight must give what one batch at a
    time gives, whatever happens to their windows afterwards. -> (originals, expected)."""
    rng = np.random.default_rng(seed)
    batches = [[rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in sizes]
               for _ in range(n_batches)]
    originals = [[w.copy() for w in b] for b in batches]
    expected = [bb.embed_windows(b)["audio"] for b in originals]
    pending = [bb.embed_windows_async(b) for b in batches]
    for b in batches:
        for w in b:
            w[:] = 1.0  # the memory is reused at once
    for p, e in zip(pending, expected):
        np.testing.assert_allclose(p.result()["audio"], e, atol=atol)
    return originals, expected


# -- the random-weight backbones, full size (tests/conftest.py builds each once a session) ----
def clap_backbone(tokenizer_dir):
    """clap-music with laion_clap's own HTSAT-base + RoBERTa, seeded random weights."""
    from qamro_pipe.extract.backbones import get_backbone
    from qamro_pipe.extract.backbones.base import RANDOM_WEIGHTS

    b = get_backbone("clap-music", checkpoint=RANDOM_WEIGHTS, offline=True,
                     tokenizer_dir=str(tokenizer_dir))
    b.load()
    b.loaded = True
    b.ensure_tokenizer()
    return b


def aesthetics_backbone():
    """aesthetics: audiobox_aesthetics' AesMultiOutput, seeded random weights, with uneven
    per-axis layer weights (seed 0), so the per-axis weighting is exercised."""
    import torch

    from qamro_pipe.extract.backbones import get_backbone
    from qamro_pipe.extract.backbones.base import RANDOM_WEIGHTS

    b = get_backbone("aesthetics", checkpoint=RANDOM_WEIGHTS)
    b.load()
    b.loaded = True
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for w in b.model.layer_weights.values():
            w.copy_(torch.randn(w.shape, generator=gen))
    return b


def muq_backbone():
    """muq: the muq package's MuQ in its published architecture, seeded random weights;
    rng_kept says whether building it left torch's and Python's random state as they were
    (MuQModel seeds both while it is built)."""
    import random

    import torch

    from qamro_pipe.extract.backbones import get_backbone
    from qamro_pipe.extract.backbones.base import RANDOM_WEIGHTS

    py, rng = random.getstate(), torch.random.get_rng_state()
    b = get_backbone("muq", checkpoint=RANDOM_WEIGHTS)
    b.load()
    b.loaded = True
    b.rng_kept = random.getstate() == py and torch.equal(torch.random.get_rng_state(), rng)
    return b
