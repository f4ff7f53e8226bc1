"""Triton kernels. Each has a torch reference it is tested against, on the CPU through TRITON_INTERPRET=1."""
