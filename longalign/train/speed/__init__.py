"""Speed: the GPU-memory model that picks recompute / compile, liger kernels, long-context offload."""
