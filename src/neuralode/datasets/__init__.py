"""Data sets for the experiments."""
