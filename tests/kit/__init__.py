"""Stand-ins shared by the test suite, importable as `kit` (pyproject.toml puts tests/ on
pytest's path); no test module imports another test module.

- kit.caches: planted synthetic caches (clip and per-layer window features), a small
  layer-weighted recipe, clip manifests for `predict --manifest`
- kit.backbones: test audio, the roberta-style tokenizer, the check of batches in flight, and
  the random-weight backbones the session builds once (full size and smallest size)
- kit.release: an Audiobox-Aesthetics release checkpoint built as its publisher builds it
- kit.mp3: MP3 files built the way encoders and taggers build them
- kit.resume: stopping a run at an epoch and comparing two runs value for value
- kit.children: real `qamro-pipe` child processes (the fault-injection suite)
- kit.cli: the CLI driven in-process
"""
