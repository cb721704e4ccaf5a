"""Masked matrix products. Kernels take tensors and ints only; each has a torch reference."""
