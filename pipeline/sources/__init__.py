"""Readers of the formats users really have (official downloads, list files, folders, generated data).

Each returns a `Source`; `pipeline.convert` turns any `Source` into the converted format.
"""
