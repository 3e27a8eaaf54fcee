"""A run: the trainer, the context it builds, checkpoints, exports, the workdir and its
lease, preemption, progress and the reports; evaluation and prediction from a workdir."""
