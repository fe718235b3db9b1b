"""Package data of autoq (installed as `autoq.kernels`): the kernel shape suite and dispatch tables."""
