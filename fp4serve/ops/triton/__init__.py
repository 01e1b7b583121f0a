"""Triton kernels for the GPU fast path, one module per kernel, each with a pure-PyTorch `*_ref` beside it.

Nothing here is imported by the CPU path: the `fp4serve.ops` wrappers import these modules lazily, only for CUDA
tensors. Triton's CPU interpreter (TRITON_INTERPRET=1, set before import) runs the same kernels on CPU tensors at
small sizes, which is how CPU CI checks their indexing and masking.
"""
