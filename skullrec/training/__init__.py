"""Training: the loop, distributed helpers, SAM/ASAM."""
