"""Triton kernels, one module per op (attention, seqpool, tokenize), each implementing the kernel-module
interface of cct_kernels.backends (unsupported / forward / backward) and listing its shipped configurations
in SM90_CHECKS for the compile check of sm90.py."""
