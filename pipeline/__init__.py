"""Data side of the trainer: converted-dataset format, readers, samplers, loaders, on-device mixing.

Knows nothing of `model` or `train`; the only thing that leaves it is a batch.
"""
