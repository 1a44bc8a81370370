"""Datasets of the paper's experiments, built on torch only."""
