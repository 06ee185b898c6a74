"""Training side: config + presets, the two stages, evaluation, checkpoints, distributed set-up."""
