"""Model building blocks (use only the public ``neuralode`` API)."""
