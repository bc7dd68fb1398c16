"""Running things: a run (run.py), a sweep's grid (sweep.py), cross-validation (cv.py), a
table (tables.py), and the run folder they stage and publish (folder.py). The only layer
that calls both train/ (learning) and report/ (reading and drawing)."""
