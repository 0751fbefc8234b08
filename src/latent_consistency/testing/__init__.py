"""Known-answer toys for tests and benchmarks: Gaussian-mixture data with an exact ε-model and PF-ODE
(`analytic`), and latent consistency distillation of it into a small MLP (`toy2d`)."""
