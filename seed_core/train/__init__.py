"""Training: the optimisation steps (`moco` for MoCo-v2 pre-training, `distill` for SEED, and
what they share in `step`), the optimiser and schedule (`schedule`), the epoch loop (`loop`),
resumable checkpoints (`resume`), stopping on a signal with one (`stop`), per-step curves (`curves`), and the run that ties them
together for both stages (`run`). Collectives come in as callables; nothing here imports
`torch.distributed`."""
