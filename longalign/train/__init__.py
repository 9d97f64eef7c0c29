"""Stage 3: the trainer, its batches and datasets, sequence parallelism, run state; speed/ holds the opt-in speed pieces."""
