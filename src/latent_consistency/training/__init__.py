"""Training: configs, the one loop shared by LCD and LCF, EMA, checkpoints."""
