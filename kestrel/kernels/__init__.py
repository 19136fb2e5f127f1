"""Triton kernels for the GPU fast path.

Each kernel has a torch reference elsewhere in the package (``kestrel.attention.torch_ref``,
``kestrel.layers.*``) and a parity test in ``tests/kernels``. On a machine without CUDA the
kernels still run under Triton's interpreter (``TRITON_INTERPRET=1``), slowly, for tests.

Modules:
    paged_attention    decode attention over the paged KV cache (GQA-packed, split-K)
    prefill_attention  varlen causal prefill/extend attention over the paged KV cache
    fused              RMSNorm(+residual), silu_and_mul, rotary (+ KV cache write) in place
    cute               the gate for optional CuTe DSL kernels (FlashAttention 4, quack) on Hopper
"""
