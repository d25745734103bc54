"""ops.text_tokenize (the text tokenizer stage: conv over the sequence spanning the word vector, ReLU, max pool along
the sequence) on every backend serving here: forward and backward against float64 with the repo's tolerance rule,
the official text_cct/text_cvt settings, the fakes (opcheck), NaN propagation, the int8 pool_index, the errors, and
the TextTokenizer module running on the op. Triton runs under TRITON_INTERPRET=1 on CPU (conftest.py); its bf16
path multiplies in fp32 there, so bf16 is tested too.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cct_kernels
from cct_kernels import backends, ops, reference
from cct_kernels.backends import BackendUnavailable
from cct_kernels.nn.text import TextTokenizer
from cct_kernels.triton import text_tokenize as triton_text_tokenize
from tests.cases import DEVICE, assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _serves(backend):
    x, w = torch.randn(1, 8, 4, device=DEVICE), torch.randn(3, 2, 4, device=DEVICE)
    return backends.unsupported_reason(backend, "text_tokenize", DEVICE, x, w, 1, 1, True, 2, 2, 1) is None


KERNELS = [b for b in backends.KERNEL_BACKENDS if _serves(b)]
SERVING = ["eager"] + KERNELS

# name: (B, L, C, E, k, stride, padding, relu, pool). The official factories: text_cct kernel k with stride
# max(1, k//2 - 1), padding max(1, k//2), ReLU, pool 2/2/1; text_cvt/vit patches k = stride, no ReLU, no pool.
CASES = {
    "text_cct_k4_odd_L": (2, 19, 20, 24, 4, 1, 2, True, (2, 2, 1)),
    "text_cct_k2": (1, 16, 12, 20, 2, 1, 1, True, (2, 2, 1)),
    "text_cct_k1": (2, 9, 7, 10, 1, 1, 1, True, (2, 2, 1)),
    "text_cvt_patches": (2, 16, 20, 24, 4, 4, 0, False, None),
    "pool_no_relu_k3_s2": (1, 13, 9, 16, 3, 2, 1, False, (3, 2, 1)),
    "relu_no_pool_odd_L": (2, 11, 10, 8, 3, 1, 0, True, None),
    # more conv rows than the cpu kernel's 64-row bands: band edges in the forward and the backward
    "long_150_pool_3_2_1": (1, 150, 6, 16, 4, 1, 2, True, (3, 2, 1)),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """The Triton launchers' uninitialised buffers start as NaN (floats) or 127 (int8), so gaps show."""
    real = triton_text_tokenize._empty

    def poisoned(*shape, device, dtype):
        return real(*shape, device=device, dtype=dtype).fill_(float("nan") if dtype.is_floating_point else 127)

    monkeypatch.setattr(triton_text_tokenize, "_empty", poisoned)


def _inputs(case, dtype, generator):
    B, L, C, E, k = case[:5]
    x = torch.randn(B, L, C, generator=generator, dtype=torch.float64)
    weight = torch.randn(E, 1, k, C, generator=generator, dtype=torch.float64) * (2 / (k * C)) ** 0.5
    return x.to(DEVICE, dtype), weight.to(DEVICE, dtype)


def _kwargs(case):
    stride, padding, relu, pool = case[5:]
    return dict(stride=stride, padding=padding, relu=relu, pool=pool)


def _run(fn, x, weight, grad_out):
    """fn(x, weight) and the gradients of (out * grad_out).sum() w.r.t. x and weight."""
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    out = fn(x, weight)
    gx, gw = torch.autograd.grad(out, (x, weight), grad_out.to(out.dtype))
    return out.detach(), gx, gw


@pytest.mark.parametrize("backend", SERVING)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_matches_float64_forward_and_backward(backend, dtype, case):
    generator = torch.Generator().manual_seed(3)
    x, weight = _inputs(CASES[case], dtype, generator)
    kw = _kwargs(CASES[case])
    exact_out = reference.text_tokenize(x.double(), weight.double(), **kw)
    grad_out = torch.randn(exact_out.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    exact = _run(lambda a, w: reference.text_tokenize(a, w, **kw), x.double(), weight.double(), grad_out)
    eager = _run(lambda a, w: reference.text_tokenize(a, w, **kw), x, weight, grad_out)
    got = _run(lambda a, w: ops.text_tokenize(a, w, **kw, backend=backend), x, weight, grad_out)
    for name, g, e, r in zip(("out", "grad_x", "grad_weight"), got, eager, exact):
        assert g.dtype == dtype and g.shape == r.shape, (name, g.dtype, g.shape, r.shape)
        assert not g.isnan().any(), f"{name}: NaN in the kernel's result (an element left unwritten?)"
        assert_close_to_reference(g, r, e, name)


@pytest.mark.parametrize("backend", SERVING)
def test_three_dim_weight_and_no_input_gradient(backend):
    """weight (E, k, C) computes what (E, 1, k, C) does; an x without gradient still gives the weight's."""
    x, weight = _inputs(CASES["text_cct_k4_odd_L"], torch.float32, torch.Generator().manual_seed(5))
    kw = _kwargs(CASES["text_cct_k4_odd_L"])
    w3 = weight.squeeze(1).clone().requires_grad_()
    out = ops.text_tokenize(x, w3, **kw, backend=backend)
    w64 = weight.double().requires_grad_()
    expected = reference.text_tokenize(x.double(), w64, **kw)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    (gw,) = torch.autograd.grad(out, (w3,), grad_out)
    (gw64,) = torch.autograd.grad(expected, (w64,), grad_out.double())
    assert gw.shape == w3.shape
    torch.testing.assert_close(gw.double(), gw64.squeeze(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_pool_index_is_the_window_offset_of_the_max(backend):
    """Where the output is positive, pool_index is max_pool's argmax as the offset inside its window."""
    x, weight = _inputs(CASES["text_cct_k4_odd_L"], torch.float32, torch.Generator().manual_seed(1))
    module = backends.kernel_module(backend, "text_tokenize")
    out, index = module.forward(x, weight.squeeze(1).contiguous(), 1, 2, True, 2, 2, 1)
    conv = F.relu(F.conv1d(x.transpose(1, 2), weight.squeeze(1).transpose(1, 2), padding=2))  # (B, E, Lc)
    pooled, flat = F.max_pool1d(conv, 2, 2, 1, return_indices=True)
    starts = torch.arange(pooled.shape[-1], device=DEVICE) * 2 - 1
    expected = (flat - starts).transpose(1, 2)
    positive = pooled.transpose(1, 2) > 0
    assert index.dtype == torch.int8 and index.shape == out.shape
    assert positive.float().mean() > 0.4
    assert torch.equal(index[positive].long(), expected[positive])
    torch.testing.assert_close(out, pooled.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", ["text_cct_k4_odd_L", "text_cvt_patches", "pool_no_relu_k3_s2"], ids=str)
def test_nan_propagates_like_the_reference(backend, case):
    """A NaN word vector gives NaN exactly where the reference does (the pool lets NaN win; ReLU keeps it and its
    backward passes the gradient there), in the output and both gradients; everything else matches."""
    x, weight = _inputs(CASES[case], torch.float32, torch.Generator().manual_seed(2))
    x[0, 5, 3] = float("nan")
    kw = _kwargs(CASES[case])
    grad_out = torch.ones_like(reference.text_tokenize(x, weight, **kw))
    expected = _run(lambda a, w: reference.text_tokenize(a, w, **kw), x, weight, grad_out)
    got = _run(lambda a, w: ops.text_tokenize(a, w, **kw, backend=backend), x, weight, grad_out)
    assert expected[0].isnan().any()
    for name, g, e in zip(("out", "grad_x", "grad_weight"), got, expected):
        assert torch.equal(g.isnan(), e.isnan()), name
        torch.testing.assert_close(g.nan_to_num(0.0), e.nan_to_num(0.0), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", KERNELS)
def test_backward_is_deterministic_and_empty_batch_works(backend):
    x, weight = _inputs(CASES["long_150_pool_3_2_1"], torch.float32, torch.Generator().manual_seed(4))
    kw = _kwargs(CASES["long_150_pool_3_2_1"])
    grad_out = torch.randn_like(reference.text_tokenize(x, weight, **kw))
    first = _run(lambda a, w: ops.text_tokenize(a, w, **kw, backend=backend), x, weight, grad_out)
    second = _run(lambda a, w: ops.text_tokenize(a, w, **kw, backend=backend), x, weight, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    empty = _run(lambda a, w: ops.text_tokenize(a, w, **kw, backend=backend), x[:0], weight, grad_out[:0])
    assert empty[0].shape == (0, grad_out.shape[1], weight.shape[0]) and empty[1].shape == x[:0].shape
    assert torch.equal(empty[2], torch.zeros_like(weight))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", ["text_cct_k4_odd_L", "text_cvt_patches"], ids=str)
def test_opcheck_forward_and_backward(backend, case):
    x, weight = _inputs(CASES[case], torch.float32, torch.Generator().manual_seed(6))
    stride, padding, relu, pool = CASES[case][5:]
    pool_args = pool or (0, 1, 0)
    w3 = weight.squeeze(1).contiguous()
    args = (x.requires_grad_(), w3.requires_grad_(), stride, padding, relu, *pool_args, backend)
    torch.library.opcheck(torch.ops.cct_kernels.text_tokenize_forward, args)
    out, index = torch.ops.cct_kernels.text_tokenize_forward(*args)
    assert index.shape == (out.shape if pool else (0,))
    for needs_input_grad in (True, False):
        torch.library.opcheck(
            torch.ops.cct_kernels.text_tokenize_backward,
            (torch.randn_like(out), x.detach(), w3.detach(), out.detach(), index, stride, padding, relu, *pool_args,
             needs_input_grad, backend))


def test_errors():
    x, w = torch.randn(2, 10, 6), torch.randn(4, 1, 3, 6)
    with pytest.raises(ValueError, match="3 dimensions"):
        ops.text_tokenize(x[0], w)
    with pytest.raises(TypeError, match="dtype"):
        ops.text_tokenize(x, w.double())
    with pytest.raises(TypeError, match="floating-point"):
        ops.text_tokenize(x.long(), w)
    with pytest.raises(ValueError, match=r"\(E, 1, k, C\)"):
        ops.text_tokenize(x, torch.randn(4, 2, 3, 6))
    with pytest.raises(ValueError, match=r"C = x's last dim"):
        ops.text_tokenize(x, torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match="stride"):
        ops.text_tokenize(x, w, stride=0)
    with pytest.raises(TypeError, match="padding"):
        ops.text_tokenize(x, w, padding=1.0)
    with pytest.raises(TypeError, match="relu"):
        ops.text_tokenize(x, w, relu=1)
    with pytest.raises(ValueError, match="pool padding"):
        ops.text_tokenize(x, w, pool=(2, 2, 2))
    with pytest.raises(ValueError, match="too short"):
        ops.text_tokenize(torch.randn(2, 2, 6), torch.randn(4, 5, 6))
    with pytest.raises(ValueError, match="unknown backend"):
        ops.text_tokenize(x, w, backend="tpu")
    with pytest.raises(BackendUnavailable, match="cuda"):
        ops.text_tokenize(x, w, backend="cuda")
    if "cpu" in KERNELS:
        with pytest.raises(RuntimeError, match="double backward"):
            xg = x.clone().requires_grad_()
            (g,) = torch.autograd.grad(ops.text_tokenize(xg, w, backend="cpu").sum(), xg, create_graph=True)
            g.sum().backward()


def test_cuda_declines_and_names_triton():
    from cct_kernels.extension import text_tokenize as extension_text_tokenize

    x, w = torch.randn(1, 8, 4), torch.randn(3, 2, 4)
    assert "triton" in extension_text_tokenize.unsupported(x, w, 1, 1, True, 2, 2, 1, backend="cuda")


def test_text_tokenizer_module_runs_the_op_on_its_backend(monkeypatch):
    """TextTokenizer keeps the official parameters, is reached by set_backend and calls ops.text_tokenize with its
    conv/pool settings; its output equals the official modules' function (conv_layers run eagerly)."""
    model = cct_kernels.text_cct_2(vocab_size=50, seq_len=16, num_classes=3)
    tokenizer = model.tokenizer
    assert [k for k in tokenizer.state_dict()] == ["conv_layers.0.weight"]
    model.set_backend("eager")
    assert tokenizer.backend == "eager"
    model.set_backend(None)
    calls = []
    real = ops.text_tokenize

    def spy(x, weight, **kwargs):
        calls.append(kwargs)
        return real(x, weight, **kwargs)

    monkeypatch.setattr(ops, "text_tokenize", spy)
    x = torch.randn(2, 16, 300)
    with torch.no_grad():
        tokens, mask = tokenizer(x)
        official = tokenizer.conv_layers(x.unsqueeze(1)).squeeze(-1).transpose(1, 2)
    assert mask is None and calls == [dict(stride=1, padding=2, relu=True, pool=(2, 2, 1), backend=None)]
    torch.testing.assert_close(tokens, official, rtol=1e-5, atol=1e-5)
    cvt = cct_kernels.text_cvt_2(vocab_size=50, seq_len=16, num_classes=3).tokenizer
    cvt(x)
    assert calls[-1] == dict(stride=4, padding=0, relu=False, pool=None, backend=None)
    assert TextTokenizer.output_length(cvt, 16) == 4


def test_model_flops_counts_the_text_tokenizer_conv(monkeypatch):
    """The tokenizer's Conv2d no longer runs its own forward; profiling counts its conv from TextTokenizer's input:
    text_cvt_2 at seq_len 64 has 16 conv rows of 4 x 300 -> 128 channels."""
    from cct_kernels import profiling

    full = profiling.model_flops("text_cvt_2", 1, "inference")
    monkeypatch.setattr(TextTokenizer, "register_forward_hook", lambda self, hook: None)
    assert full - profiling.model_flops("text_cvt_2", 1, "inference") == 2 * 16 * 128 * 4 * 300


def test_triton_kernels_build_for_sm90_without_spills():
    """SM90_CHECKS (the text_cct_6, text_cvt_6 and float32 text_cct_2 tokenizers) compiled for sm_90 as the JIT
    specialises them at launch (cct_kernels.triton.sm90, in a process without the interpreter): no spills, and the
    16-bit GEMMs on wgmma. text_tokenize is not in sm90.OPS, so test_triton_sm90 does not cover it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json; from cct_kernels.triton import sm90; print(json.dumps(sm90.op_figures('text_tokenize')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(proc.stdout.splitlines()[-1])
    assert len(figures) == 4 * len(triton_text_tokenize.SM90_CHECKS)
    for name, f in figures.items():
        assert f["spill_bytes"] == 0 and f["registers"] <= 255 and f["shared_bytes"] <= 227 * 1024, (name, f)
        if "fp32" not in name and "_grad_rows_" not in name:
            assert f["mma"] == "wgmma", (name, f)
