"""The parts of benchmarks/fault_injection.py: running and killing the training job (child.py,
kills.py), damaging checkpoint files (corruption.py), reading checkpoints without the trainer's
code (independent.py) and keeping the books on what happened to each step (ledger.py)."""
