"""Key padding in the Triton kernels: the real tokens of each sequence, shared by attention and SeqPool."""
import triton
import triton.language as tl


@triton.jit
def real_tokens(Lengths, b, N, HAS_LENGTHS: tl.constexpr):
    """Real tokens of sequence b: Lengths[b] (int64, a prefix, 0..N) with key padding, else all N. Token loops
    stop there, so blocks of padding are never loaded or computed (as FlashAttention's varlen path)."""
    if HAS_LENGTHS:
        count = tl.load(Lengths + b).to(tl.int32)
    else:
        count = N
    return count
