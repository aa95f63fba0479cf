"""Plain PyTorch references: the ground truth for tests and the fallback path on devices without Triton."""
