"""Triton kernels of fusedlm, one module per op.

This package imports triton only, never fusedlm or torch: the launchers here take tensors that
the caller (fusedlm.ops) has allocated and validated, compute the launch grid, and launch.
"""
