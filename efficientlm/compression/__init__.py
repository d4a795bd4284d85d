"""Model compression after training: one-shot pruning (SparseGPT and the magnitude baseline)."""
