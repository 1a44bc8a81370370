"""Models built on :class:`neuralode.NeuralODE` (each module is self-contained; import what you need)."""
