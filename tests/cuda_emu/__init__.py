"""The CPU emulation of kernels/adamw_kernel.cu: build.py, cases.py, and
tests/test_kernel_emulation.py."""
