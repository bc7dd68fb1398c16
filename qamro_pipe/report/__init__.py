"""Reading results: metrics with confidence intervals, re-scoring a run (evaluate) and the
paper's tables."""
