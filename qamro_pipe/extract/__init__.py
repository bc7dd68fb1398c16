"""Stage 1, audio files -> cache: dataset loaders (datasets/), decoding (audio), frozen models
(backbones/), the extraction loop (loop) and job-array shards (shards). Nothing here imports
stage 2."""
