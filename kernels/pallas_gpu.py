"""Mosaic GPU kernel for sparse attention: not written yet (see kernels/NOTES.md)."""

from kernels.errors import UnsupportedInput


def sparse_attention_gpu(q, k, v, pattern, *, block_q=None, block_k=None):
    raise UnsupportedInput("the pallas_gpu kernel is not implemented yet; use impl='reference' "
                           "(or jax.nn.dot_product_attention(implementation='cudnn') for dense causal)")
