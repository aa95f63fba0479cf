"""fastkern's benches: per-op cases through one runner (``python bench/run.py``) and end-to-end training
benches (``python -m bench.e2e.<name>`` from the repository root); every result is a row of bench/schema.py."""
