"""T5X-style training: optimizers, the jitted step, checkpoints, metrics and the loop."""
