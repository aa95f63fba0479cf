"""End-to-end benches: whole training steps (TRL SFT, GRPO, DPO; long context; several GPUs; offloaded
checkpointing). Run from the repository root as ``python -m bench.e2e.<name>``; each has a ``--tiny`` CPU
mode (tiny model built from a config, nothing downloaded) and writes rows of bench/schema.py
(``op`` is the bench, ``case`` the training mode, ``impl`` the variant, ``ms`` the median step time,
``throughput`` tokens/s, ``peak_mib`` with its ``peak_scope``, ``loss``), which bench/plot.py and
bench/compare.py read."""
