"""A small synthetic corpus in the MusicEval layout, for offline demos and tests.

THE LABELS ARE SYNTHETIC. No person listened to these clips: every score is computed from how
the clip was made, by the fixed formulas below, plus simulated rater noise. The corpus checks
that the pipeline runs and that a model can recover a designed ordering; it says nothing about
how a model does on real human ratings.

What is written (write_demo_corpus): each prompt describes a piece ("calm piano arpeggio in
C major, slow tempo, low register") and its audio is synthesised from that description
(instrument timbre, key and mode, tempo, register, pattern), so text and audio agree. Each
system renders every prompt and then degrades it in its own designed way (SYSTEM_DESIGNS):
one clean reference, noise at several SNRs, band limits, soft and hard distortion, pitch
wobble, dropouts, and one system that ignores its prompt (it renders another prompt's piece).

Scores: a system's true "overall" = 4.6 - 3.4 * severity; its true "textual" =
4.4 - 0.8 * severity - 2.6 * (ignores the prompt). Each clip adds its own variation
(N(0, 0.3)); five simulated raters each add N(0, 0.6) and give an integer 1-5; the clip's
label is their mean (steps of 0.2, like MusicEval's means of 5 ratings). The system MOS file
holds each system's mean label over its clips.

System S001 (the clean reference) has per-clip prompts in demo_prompt_info.txt (reworded
prompts), as MusicEval's S001 does; any other CLIP_PROMPT_SYSTEMS member (S006) falls back to
prompt_info.txt, as the loader allows.

Preference pairs (pairs.jsonl, docs/preference.md's layout, paths relative to the corpus):
for each prompt, PAIRS_PER_PROMPT pairs of two systems' clips of it, judged by the same
simulated raters: each of the N_RATERS rates both clips (integer 1-5 around each clip's true
overall score, sd RATER_SD) and prefers the higher; the majority wins, a draw is a tie. A
pair's outcome is drawn from the clips' true scores, not from their labels.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ...errors import DataError, QamroError
from . import musiceval as me
from .base import DatasetRecords, load_dataset, register_dataset

NAME = "demo"
# 24 systems x 20 prompts = 480 clips: enough systems for system-level figures with usable
# confidence intervals, and still about a minute for `make demo` on two cores
N_SYSTEMS, N_PROMPTS = 24, 20
MARKER_FILE = "demo_corpus.json"  # written last: its presence means a complete corpus
FORMAT_VERSION = 2  # bump whenever the same options would write different bytes (2: pairs)
DEV_FRACTION = 0.2
N_RATERS, CLIP_SD, RATER_SD = 5, 0.3, 0.6
OVERALL_CLEAN, OVERALL_SPAN = 4.6, 3.4
TEXTUAL_MATCH, TEXTUAL_SEVERITY, TEXTUAL_OFF_PROMPT = 4.5, 2.0, 2.6
PEAK = 0.9  # every clip is peak-normalised to this, so loudness does not give systems away
PAIRS_FILE, PAIRS_PER_PROMPT = "pairs.jsonl", 40  # 24 systems x 20 prompts: 800 pairs


@dataclass(frozen=True)
class SystemDesign:
    """How one system degrades the clean rendering, and how bad raters find it."""

    description: str
    severity: float  # 0 = clean .. 1 = worst; sets the overall score
    off_prompt: bool = False  # renders another prompt's piece
    noise_snr_db: float | None = None  # white noise at this SNR
    lowpass_hz: float | None = None  # band limit
    drive: float | None = None  # tanh soft distortion
    clip_level: float | None = None  # hard clip at this fraction of the peak
    wobble: float | None = None  # relative pitch deviation at WOBBLE_HZ
    dropouts: int = 0  # number of DROPOUT_S silences


WOBBLE_HZ, DROPOUT_S = 0.7, 0.12
# In the order systems are added (S001, S002, ...), so a small corpus still spans the range.
SYSTEM_DESIGNS = (
    SystemDesign("clean reference", 0.0),
    SystemDesign("white noise at 20 dB SNR", 0.35, noise_snr_db=20.0),
    SystemDesign("band-limited to 3 kHz", 0.3, lowpass_hz=3000.0),
    SystemDesign("hard clipping at 20% of the peak", 0.7, clip_level=0.2),
    SystemDesign("pitch wobble of 3% at 0.7 Hz", 0.5, wobble=0.03),
    SystemDesign("8 dropouts of 120 ms", 0.6, dropouts=8),
    SystemDesign("noise at 5 dB SNR, band-limited to 2 kHz", 0.95, noise_snr_db=5.0,
                 lowpass_hz=2000.0),
    SystemDesign("soft tanh distortion, drive 6", 0.45, drive=6.0),
    SystemDesign("faint noise at 35 dB SNR", 0.1, noise_snr_db=35.0),
    # Telling this one apart needs audio-text grounding, which the weightless melstats
    # backbone does not have (CLAP does): with melstats its textual score stays a hard case.
    SystemDesign("ignores its prompt (renders another prompt's piece)", 0.15, off_prompt=True),
    # the same kinds of damage at other strengths, so systems span the scale densely
    SystemDesign("white noise at 30 dB SNR", 0.2, noise_snr_db=30.0),
    SystemDesign("white noise at 12 dB SNR", 0.55, noise_snr_db=12.0),
    SystemDesign("white noise at 6 dB SNR", 0.75, noise_snr_db=6.0),
    SystemDesign("band-limited to 5 kHz", 0.15, lowpass_hz=5000.0),
    SystemDesign("band-limited to 1.5 kHz", 0.6, lowpass_hz=1500.0),
    SystemDesign("hard clipping at 50% of the peak", 0.3, clip_level=0.5),
    SystemDesign("hard clipping at 8% of the peak", 0.9, clip_level=0.08),
    SystemDesign("soft tanh distortion, drive 2", 0.2, drive=2.0),
    SystemDesign("soft tanh distortion, drive 20", 0.7, drive=20.0),
    SystemDesign("3 dropouts of 120 ms", 0.3, dropouts=3),
    SystemDesign("16 dropouts of 120 ms", 0.85, dropouts=16),
    SystemDesign("pitch wobble of 1% at 0.7 Hz", 0.25, wobble=0.01),
    SystemDesign("noise at 20 dB SNR and clipping at 30%", 0.65, noise_snr_db=20.0,
                 clip_level=0.3),
    SystemDesign("band-limited to 2.5 kHz with 6 dropouts", 0.8, lowpass_hz=2500.0,
                 dropouts=6),
)


def designed_scores(design: SystemDesign) -> tuple[float, float]:
    """A system's true (overall, textual) before clip variation and rater noise."""
    overall = OVERALL_CLEAN - OVERALL_SPAN * design.severity
    textual = (TEXTUAL_MATCH - TEXTUAL_SEVERITY * design.severity
               - TEXTUAL_OFF_PROMPT * design.off_prompt)
    return overall, textual


# ---- prompts: a description, and the parameters the audio is rendered from ----

@dataclass(frozen=True)
class Timbre:
    ratios: tuple[float, ...]  # partial frequencies / f0
    amps: tuple[float, ...]
    attack: float  # s
    decay: float | None  # exponential decay time constant (s); None = sustained
    release: float  # s


INSTRUMENTS = {
    "piano": Timbre((1, 2, 3, 4, 5, 6), (1, .5, .3, .2, .12, .08), .005, .7, .15),
    "synth": Timbre(tuple(range(1, 11)), tuple(1 / k for k in range(1, 11)), .01, .35, .05),
    "string pad": Timbre((1, 2, 3, 4, 5), (1, .6, .4, .25, .15), .25, None, .3),
    "organ": Timbre((1, 2, 3, 4, 6, 8), (1, .8, .5, .3, .2, .1), .02, None, .05),
    "marimba": Timbre((1, 3.93, 9.4), (1, .35, .1), .003, .25, .1),
    "bells": Timbre((1, 2.76, 5.4, 8.93), (1, .6, .35, .2), .002, 1.2, .3),
}
PATTERNS = ("arpeggio", "chords", "melody")
KEYS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "Bb": 10}
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
TEMPI = {"slow": 70, "moderate": 100, "fast": 140}  # bpm
REGISTERS = {"low": 48, "mid": 60, "high": 72}  # MIDI note of C in that register
MOODS = {("major", "slow"): "calm", ("major", "moderate"): "warm", ("major", "fast"): "bright",
         ("minor", "slow"): "melancholic", ("minor", "moderate"): "wistful",
         ("minor", "fast"): "tense"}
PROGRESSION = (0, 3, 4, 0)  # scale degrees of the chords, two beats each (I IV V I)


@dataclass(frozen=True)
class Prompt:
    id: str
    instrument: str
    pattern: str
    key: str
    mode: str
    tempo: str
    register: str

    @property
    def text(self) -> str:
        mood = MOODS[self.mode, self.tempo]
        return (f"{mood} {self.instrument} {self.pattern} in {self.key} {self.mode}, "
                f"{self.tempo} tempo, {self.register} register")

    @property
    def reworded(self) -> str:
        """The per-clip wording of demo_prompt_info.txt: same content, other words."""
        mood = MOODS[self.mode, self.tempo]
        return (f"{self.key} {self.mode} {self.instrument} {self.pattern} with a {mood} mood, "
                f"{self.tempo} tempo, {self.register} register")


def make_prompts(n: int, seed: int) -> list[Prompt]:
    """n distinct prompts; instruments and patterns cycle so a few prompts already vary."""
    rng = np.random.default_rng([seed, 0])
    out: list[Prompt] = []
    seen: set[str] = set()
    instruments = list(INSTRUMENTS)
    while len(out) < n:
        i = len(out)
        p = Prompt(id=f"P{i + 1:03d}", instrument=instruments[i % len(instruments)],
                   pattern=PATTERNS[(i + i // len(instruments)) % len(PATTERNS)],
                   key=str(rng.choice(list(KEYS))), mode=str(rng.choice(list(SCALES))),
                   tempo=str(rng.choice(list(TEMPI))), register=str(rng.choice(list(REGISTERS))))
        if p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out


def _notes(p: Prompt, seconds: float, rng: np.random.Generator) -> list[tuple[float, float, int]]:
    """(onset s, duration s, MIDI pitch) of the piece a prompt describes."""
    beat, scale = 60.0 / TEMPI[p.tempo], SCALES[p.mode]
    tonic = REGISTERS[p.register] + KEYS[p.key]

    def pitch(degree: int) -> int:
        return tonic + 12 * (degree // 7) + scale[degree % 7]

    notes, t, bar, walk = [], 0.0, 0, 0
    while t < seconds:
        root = PROGRESSION[bar % len(PROGRESSION)]
        triad = (root, root + 2, root + 4)
        if p.pattern == "chords":
            notes += [(t, 2 * beat, pitch(d)) for d in triad]
        elif p.pattern == "arpeggio":
            notes += [(t + k * beat / 2, beat * 0.75, pitch(d))
                      for k, d in enumerate((*triad, root + 7))]
        else:  # melody: a walk on the scale that leans towards the chord
            for k in range(2):
                walk = int(np.clip(walk + rng.integers(-2, 3), -2, 9))
                if k == 0:
                    walk = min(triad, key=lambda d: abs(d - walk))
                notes.append((t + k * beat, beat * 0.9, pitch(walk)))
        t, bar = t + 2 * beat, bar + 1
    return [n for n in notes if n[0] < seconds]


def render(p: Prompt, seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    """The clean piece a prompt describes, peak-normalised, float64 [n]."""
    rng = np.random.default_rng([seed, 1, int(p.id[1:])])
    timbre, n = INSTRUMENTS[p.instrument], int(round(seconds * sample_rate))
    out = np.zeros(n)
    ratios, amps = np.array(timbre.ratios), np.array(timbre.amps)
    for onset, dur, midi in _notes(p, seconds, rng):
        f0 = 440.0 * 2 ** ((midi - 69) / 12)
        keep = f0 * ratios < 0.45 * sample_rate  # no aliasing partials
        start = int(onset * sample_rate)
        length = min(int((dur + timbre.release) * sample_rate), n - start)
        t = np.arange(length) / sample_rate
        env = np.minimum(1.0, t / timbre.attack)
        if timbre.decay is not None:
            env *= np.exp(-t / timbre.decay)
        env *= np.clip((dur + timbre.release - t) / timbre.release, 0.0, 1.0)  # release ramp
        phases = rng.uniform(0, 2 * np.pi, size=int(keep.sum()))
        partials = np.sin(2 * np.pi * f0 * np.outer(ratios[keep], t) + phases[:, None])  # [P, T]
        out[start:start + length] += rng.uniform(0.7, 1.0) * env * (amps[keep] @ partials)
    return out * (PEAK / max(np.abs(out).max(), 1e-9))


# ---- degradations ----

def degrade(x: np.ndarray, d: SystemDesign, sample_rate: int,
            rng: np.random.Generator) -> np.ndarray:
    """A system's version of a clean rendering, peak-normalised."""
    y = x.copy()
    if d.wobble:
        t = np.arange(len(y)) / sample_rate
        # read time runs at rate 1 + wobble * sin(2 pi f t): the pitch follows it
        warp = t + d.wobble / (2 * np.pi * WOBBLE_HZ) * (1 - np.cos(2 * np.pi * WOBBLE_HZ * t))
        y = np.interp(warp * sample_rate, np.arange(len(y)), y, right=0.0)
    if d.drive:
        y = np.tanh(d.drive * y) / np.tanh(d.drive)
    if d.clip_level:
        c = d.clip_level * np.abs(y).max()
        y = np.clip(y, -c, c)
    if d.dropouts:
        width = int(DROPOUT_S * sample_rate)
        for s in rng.integers(0, max(len(y) - width, 1), size=d.dropouts):
            y[s:s + width] = 0.0
    if d.noise_snr_db is not None:
        rms = np.sqrt(np.mean(y ** 2))
        y = y + rng.standard_normal(len(y)) * rms / 10 ** (d.noise_snr_db / 20)
    if d.lowpass_hz:
        f = np.fft.rfftfreq(len(y), 1 / sample_rate)
        gain = 1 / np.sqrt(1 + (f / d.lowpass_hz) ** 16)  # 8th-order Butterworth magnitude
        y = np.fft.irfft(np.fft.rfft(y) * gain, n=len(y))
    return y * (PEAK / max(np.abs(y).max(), 1e-9))


# ---- scores ----

def _rated(true: float, rng: np.random.Generator) -> float:
    """Mean of N_RATERS integer 1-5 ratings around a clip's true score."""
    ratings = np.clip(np.rint(true + rng.normal(0, RATER_SD, N_RATERS)), 1, 5)
    return round(float(ratings.mean()), 1)


def _clip_labels(d: SystemDesign, rng: np.random.Generator) -> tuple[float, float, float]:
    """(overall label, textual label, the clip's true overall score)."""
    overall, textual = designed_scores(d)
    true_overall = overall + rng.normal(0, CLIP_SD)
    label = _rated(true_overall, rng)
    return label, _rated(textual + rng.normal(0, CLIP_SD), rng), true_overall


def rated_preference(true_a: float, true_b: float, rng: np.random.Generator) -> str:
    """The raters asked which of two clips is better (module docstring): A, B or tie."""
    ra = np.clip(np.rint(true_a + rng.normal(0, RATER_SD, N_RATERS)), 1, 5)
    rb = np.clip(np.rint(true_b + rng.normal(0, RATER_SD, N_RATERS)), 1, 5)
    votes = int(np.sum(ra > rb)) - int(np.sum(rb > ra))
    return "A" if votes > 0 else "B" if votes < 0 else "tie"


def demo_pairs(clips: dict[tuple[int, int], tuple[str, float]], n_systems: int,
               prompts: list[Prompt], seed: int) -> list[dict]:
    """The corpus's preference pairs: clips[(system, prompt)] = (wav name, true overall)."""
    if n_systems < 2:
        return []
    rng = np.random.default_rng([seed, 4])
    every = [(a, b) for a in range(n_systems) for b in range(a + 1, n_systems)]
    out = []
    for i, p in enumerate(prompts):
        take = rng.choice(len(every), min(PAIRS_PER_PROMPT, len(every)), replace=False)
        for n in take:
            a, b = every[n] if rng.random() < 0.5 else every[n][::-1]
            (wav_a, true_a), (wav_b, true_b) = clips[(a, i)], clips[(b, i)]
            out.append({"id": f"{p.id}-{len(out)}", "prompt": p.text,
                        "audio_a": f"{me.WAV_DIR}/{wav_a}", "audio_b": f"{me.WAV_DIR}/{wav_b}",
                        "winner": rated_preference(true_a, true_b, rng)})
    return out


# ---- the corpus ----

def _options(n_systems: int, n_prompts: int, seconds: float, sample_rate: int,
             seed: int) -> dict:
    if not 1 <= n_systems <= len(SYSTEM_DESIGNS):
        raise QamroError(f"demo corpus: n_systems must be 1..{len(SYSTEM_DESIGNS)}, "
                         f"got {n_systems}")
    if not 2 <= n_prompts <= 999:
        raise QamroError(f"demo corpus: n_prompts must be 2..999 (each system needs a train "
                         f"and a dev clip), got {n_prompts}")
    if not 0.5 <= seconds <= 60 or sample_rate < 8000:
        raise QamroError(f"demo corpus: need 0.5 <= seconds <= 60 and sample_rate >= 8000, "
                         f"got {seconds} s at {sample_rate} Hz")
    return {"format": FORMAT_VERSION, "n_systems": int(n_systems), "n_prompts": int(n_prompts),
            "seconds": float(seconds), "sample_rate": int(sample_rate), "seed": int(seed)}


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_FILE).read_text())["options"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_demo_corpus(root: Path, n_systems: int = N_SYSTEMS, n_prompts: int = N_PROMPTS,
                      seconds: float = 3.0,
                      sample_rate: int = 16000, seed: int = 0) -> Path:
    """Write the corpus at root (replacing an earlier demo corpus there) and return root.

    The same options write the same bytes. A folder that holds anything but a demo corpus is
    refused rather than overwritten.
    """
    root = Path(root)
    opts = _options(n_systems, n_prompts, seconds, sample_rate, seed)
    is_demo = _read_marker(root) is not None
    if root.exists() and not is_demo and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not a demo corpus (no {MARKER_FILE}); "
                        f"refusing to write the demo corpus over it")
    # write beside the target and swap it in whole, so an interrupted write leaves no half corpus
    tmp = root.parent / f".{root.name}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, opts)
        if root.exists():
            shutil.rmtree(root) if is_demo else root.rmdir()
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write(root: Path, opts: dict) -> None:
    sr, seconds, seed = opts["sample_rate"], opts["seconds"], opts["seed"]
    prompts = make_prompts(opts["n_prompts"], seed)
    clean = [render(p, seconds, sr, seed) for p in prompts]
    systems = [f"S{i + 1:03d}" for i in range(opts["n_systems"])]
    per_clip_system = min(s for s in systems if s in me.CLIP_PROMPT_SYSTEMS) \
        if me.CLIP_PROMPT_SYSTEMS & set(systems) else None

    (root / me.WAV_DIR).mkdir(parents=True)
    lines: dict[str, list[str]] = {split: [] for split in me.LIST_FILES}
    system_rows, clip_prompt_rows = [], []
    truth: dict[tuple[int, int], tuple[str, float]] = {}
    n_dev = max(1, min(len(prompts) - 1, round(DEV_FRACTION * len(prompts))))
    for s, (system, design) in enumerate(zip(systems, SYSTEM_DESIGNS)):
        dev = set(np.random.default_rng([seed, 3, s]).choice(len(prompts), n_dev, replace=False))
        labels = []
        for i, p in enumerate(prompts):
            rng = np.random.default_rng([seed, 2, s, i])
            source = (i + 1 + rng.integers(len(prompts) - 1)) % len(prompts) \
                if design.off_prompt else i
            audio = degrade(clean[source], design, sr, rng)
            wav = f"{me.WAV_PREFIX}{system}_{p.id}.wav"
            sf.write(root / me.WAV_DIR / wav, audio, sr, subtype="PCM_16")
            overall, textual, truth[(s, i)] = _clip_labels(design, rng)
            truth[(s, i)] = (wav, truth[(s, i)])
            labels.append((overall, textual))
            lines["dev" if i in dev else "train"].append(f"{wav},{overall:.1f},{textual:.1f}")
            if system == per_clip_system:
                clip_prompt_rows.append(f"{wav}\t{p.reworded}")
        mean = np.mean(labels, axis=0)
        system_rows.append(f"{system},{mean[0]:.4f},{mean[1]:.4f}")

    for split, rel in me.LIST_FILES.items():
        _write_lines(root / rel, sorted(lines[split]))
    _write_lines(root / me.PROMPT_FILE, ["id\ttext"] + [f"{p.id}\t{p.text}" for p in prompts])
    _write_lines(root / me.CLIP_PROMPT_FILE, ["id\ttext"] + clip_prompt_rows)
    _write_lines(root / me.SYSTEM_MOS_FILE, system_rows)
    _write_lines(root / PAIRS_FILE, [json.dumps(p) for p in demo_pairs(
        truth, len(systems), prompts, seed)])
    marker = {"options": opts, "labels": "SYNTHETIC: computed from designed degradations, "
              "not rated by people", "systems": {s: dataclasses.asdict(d) for s, d in
                                                 zip(systems, SYSTEM_DESIGNS)}}
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@register_dataset(NAME)
def load_demo(root: Path, n_systems: int = N_SYSTEMS, n_prompts: int = N_PROMPTS,
              seconds: float = 3.0, sample_rate: int = 16000, seed: int = 0,
              rewrite: bool = False, **musiceval_options) -> DatasetRecords:
    """The demo corpus at root, written first if root is missing or empty.

    A demo corpus already at root is reused when its options match; when they differ it is
    refused (the embeddings cached from it would no longer describe it), or, with rewrite,
    written anew (`make demo` does, after an upgrade changed the demo's size).
    """
    root = Path(root)
    opts = _options(n_systems, n_prompts, seconds, sample_rate, seed)
    found = _read_marker(root)
    if found is None or (found != opts and rewrite):
        write_demo_corpus(root, n_systems, n_prompts, seconds, sample_rate, seed)
    elif found != opts:
        raise DataError(f"{root / MARKER_FILE}: demo corpus written with {found}, asked for "
                        f"{opts}; use another folder, or remove this one to rewrite it")
    records = load_dataset(me.NAME, root, **musiceval_options)
    return dataclasses.replace(records, name=NAME)
