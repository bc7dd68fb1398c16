"""qamro-pipe: QAMRO MOS prediction as a two-stage embedding-cache pipeline.

The Python face is `Scorer` (qamro_pipe.scorer): `Scorer.load(RUN).score([...])`. It is
imported on first use, so `import qamro_pipe` stays light (no torch)."""

__version__ = "0.1.0"
__all__ = ["Scorer", "__version__"]


def __getattr__(name: str):
    if name == "Scorer":  # on first use: the scorer imports torch and the backbones' code
        from .scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'qamro_pipe' has no attribute {name!r}")
