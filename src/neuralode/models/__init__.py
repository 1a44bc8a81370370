"""Models built on the public neuralode API (odeint, NeuralODE)."""
