"""Triton kernels and their launchers. Imported lazily by hiertcn_fast.ops, so that importing
hiertcn_fast never imports triton, and TRITON_INTERPRET can still be set before first use."""
