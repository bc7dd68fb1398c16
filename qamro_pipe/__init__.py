"""qamro-pipe: QAMRO MOS prediction as a two-stage embedding-cache pipeline."""

__version__ = "0.1.0"
