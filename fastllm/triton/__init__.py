"""Triton kernels of fastllm and their launchers (no autograd here; see fastllm/ops)."""
