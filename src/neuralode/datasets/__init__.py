"""Datasets for the paper's experiments (each module is self-contained; import what you need)."""
