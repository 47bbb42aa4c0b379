"""What every benchmark shares: one load driver (load.py), one machine-noise meter (meter.py), one
atomic JSON writer and the default output folder (outputs.py), one leak check (leaks.py), the
prompts the workloads use (prompts.py) and the third-party library helpers (libraries.py)."""
