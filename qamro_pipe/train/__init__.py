"""Stage 2, cache -> run folder: head inputs (inputs), losses, batched heads (heads), the
trainer, sweeps, recipes and run folders (runs). Nothing here imports stage 1."""
