"""python -m epa_ext.train ... (the same as epa-train)."""

from .trainer import main

main()
