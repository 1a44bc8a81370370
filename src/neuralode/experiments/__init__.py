"""Experiments of the paper, each a reproducible program over the public library API.

Every experiment module exposes ``register(commands, train)`` which adds its sub-commands to the
command line (``commands``: top-level sub-parsers, ``train``: the sub-parsers of ``neuralode train``).
"""
