"""Masked (key-padding) attention, the text models' attention: eager reference, torch.compile of it, torch SDPA
with a boolean key mask, and every kernel backend of cct_kernels that serves lengths, forward and forward+backward.

Length mixes: lengths uniform in [8, 64] at N = 64 (text_cct at seq_len 64 has 33 tokens; a batch of short and long
sentences), and lengths uniform in [32, 512] at N = 512 (a long-sequence case). Each kernel backend also runs the
same batch without its mask ("<backend>-dense"): the difference is what skipping padding saves.

Work counted: real work only, 4*H*d*sum_b(N*L_b) FLOPs forward (every query against its sequence's L_b real keys)
and 14*H*d*... with backward (3.5x), as in benchmarks/test_bench_attention.py; a dense kernel does N/mean(L)
times more. See benchmarks/NOTES.md, "## masked attention".

    pytest benchmarks/test_bench_masked_attention.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.speed_paths import kernel_backends
from cct_kernels import ops, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
HEAD_DIM = 64
CASES = {  # name -> (B, H, N, shortest length)
    "cuda": {"B128_H4_N64_len8-64": (128, 4, 64, 8), "B32_H4_N512_len32-512": (32, 4, 512, 32)},
    "cpu": {"B32_H4_N64_len8-64": (32, 4, 64, 8), "B4_H4_N512_len32-512": (4, 4, 512, 32)},
}[DEVICE.type]


def _inputs(B, H, N, shortest, requires_grad=False):
    generator = torch.Generator().manual_seed(N)
    qkv = torch.randn(B, N, 3 * H * HEAD_DIM, generator=generator).to(DEVICE, DTYPE).requires_grad_(requires_grad)
    lengths = torch.randint(shortest, N + 1, (B,), generator=generator).to(DEVICE)
    return qkv, lengths


def _sdpa(qkv, num_heads, lengths):
    B, N, _ = qkv.shape
    q, k, v = qkv.unflatten(-1, (3, num_heads, HEAD_DIM)).permute(2, 0, 3, 1, 4)
    keep = (torch.arange(N, device=qkv.device)[None, :] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, N, -1)


def _reference(qkv, num_heads, lengths):
    mask = torch.arange(qkv.shape[1], device=qkv.device)[None, :] < lengths[:, None]
    return reference.attention(qkv, num_heads, mask=mask)


_compiled = torch.compile(_reference)
KERNELS = kernel_backends(
    "attention", [(_inputs(B, H, N, s)[0][:2], H, HEAD_DIM**-0.5, 0.0, _inputs(B, H, N, s)[1][:2])
                  for B, H, N, s in CASES.values()], DEVICE)
BACKENDS = ["eager", "compile", "sdpa"] + KERNELS + [f"{k}-dense" for k in KERNELS]


def _fn(backend):
    if backend == "eager":
        return _reference
    if backend == "compile":
        return _compiled
    if backend == "sdpa":
        return _sdpa
    if backend.endswith("-dense"):
        name = backend.removesuffix("-dense")
        return lambda qkv, num_heads, lengths: ops.attention(qkv, num_heads, backend=name)
    return lambda qkv, num_heads, lengths: ops.attention(qkv, num_heads, mask=lengths, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_masked_attention(measure, benchmark, mode, case, backend):
    B, H, N, shortest = CASES[case]
    backward = mode == "forward_backward"
    qkv, lengths = _inputs(B, H, N, shortest, requires_grad=backward)
    fn = _fn(backend)
    benchmark.group = f"masked attention {case} {mode}"
    if backward:
        grad_out = torch.randn(B, N, H * HEAD_DIM, device=DEVICE, dtype=DTYPE)

        def step():
            return torch.autograd.grad(fn(qkv, H, lengths), qkv, grad_out)
    else:
        def step():
            with torch.no_grad():
                return fn(qkv, H, lengths)

    real_flops = (14 if backward else 4) * H * HEAD_DIM * N * int(lengths.sum())
    info = measure(step, flops=real_flops, items=B, dtype=DTYPE, backend=backend)
    info.update(case=case, mean_length=float(lengths.float().mean()), dtype=str(DTYPE))
