"""Triton kernels only: no autograd, no transformers. Importing a module here imports triton."""
