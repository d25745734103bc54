"""torch.compile over our ops: the fake implementations state the real output shapes and strides on every layout
path of every kernel (torch.library.opcheck, forward and backward ops), and compile(fullgraph=True) with inductor
runs every model family, inference and training, on every backend that can serve it here."""
import pytest
import torch

import cct_kernels
from cct_kernels import backends, profiling

from tests.cases import DEVICE, backends_serving_model

# The cpu tokenizer's layout paths (csrc/cpu/tokenize.cpp): the direct stem (C_in*k*k <= 32 with a pool), the
# general path with a channels-last convolution (3x3, or C_in <= 4) or an NCHW one (7x7 over > 4 channels, 1x1),
# and no pool (the patch embedding; a 1x1 conv whose token output is a permuted view) - each as tokens and NCHW.
# The triton kernel returns its NCHW output (and pool_index) channels-last and grad_x in x's layout: its paths are
# the flat-K patch embedding and a per-tap stage reading a channels-last x (the previous stage's output).
TOKENIZE_PATHS = {
    "direct-stem": dict(c_in=3, c_out=8, k=3, stride=1, padding=1, pool=(3, 2, 1)),
    "channels-last-3x3": dict(c_in=8, c_out=6, k=3, stride=1, padding=1, pool=(3, 2, 1)),
    "nchw-7x7": dict(c_in=8, c_out=6, k=7, stride=2, padding=3, pool=(3, 2, 1)),
    "nchw-1x1": dict(c_in=40, c_out=6, k=1, stride=2, padding=0, pool=(3, 2, 1)),
    "patch-no-pool": dict(c_in=3, c_out=8, k=4, stride=4, padding=0, pool=None),
    "1x1-no-pool": dict(c_in=5, c_out=6, k=1, stride=1, padding=0, pool=None),
    "channels-last-input": dict(c_in=16, c_out=6, k=3, stride=1, padding=1, pool=(3, 2, 1), channels_last=True),
}
TRITON_INTERPRETED_PATHS = ("patch-no-pool", "channels-last-input")  # the interpreter is too slow for every path


def _kernel_backends(op, *inputs):
    return [b for b in backends.KERNEL_BACKENDS if backends.unsupported_reason(b, op, DEVICE, *inputs) is None]


def _tokenize_cases():
    for path, p in TOKENIZE_PATHS.items():
        x = torch.randn(2, p["c_in"], 12, 12, device=DEVICE)
        if p.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(p["c_out"], p["c_in"], p["k"], p["k"], device=DEVICE)
        pool = p["pool"] or (0, 1, 0)
        for to_tokens in (True, False):
            args = (x, w, torch.randn(p["c_out"], device=DEVICE), p["stride"], p["padding"], True, *pool, to_tokens)
            for backend in _kernel_backends("tokenize", *args):
                if backend == "triton" and DEVICE.type == "cpu" and path not in TRITON_INTERPRETED_PATHS:
                    continue
                yield pytest.param(args, backend, id=f"{path}-{'tokens' if to_tokens else 'nchw'}-{backend}")


def _with_grad(args):
    return tuple(a.clone(memory_format=torch.preserve_format).requires_grad_()
                 if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("args,backend", list(_tokenize_cases()))
def test_tokenize_fakes_match_every_layout_path(args, backend):
    torch.library.opcheck(torch.ops.cct_kernels.tokenize_forward, (*_with_grad(args), backend))
    out, index = torch.ops.cct_kernels.tokenize_forward(*args, backend)
    x, w, b, *params = args
    grads = [torch.randn_like(out)]  # in out's layout
    if not out.is_contiguous():
        grads.append(torch.randn(out.shape, device=DEVICE))  # row-major: autograd may hand over either
    for grad_out in grads:
        backward_args = (grad_out, x, w, b, out, index, *params, True, backend)
        torch.library.opcheck(torch.ops.cct_kernels.tokenize_backward, backward_args)


def _attention_and_seqpool_cases():
    qkv = torch.randn(2, 9, 3 * 2 * 8, device=DEVICE)
    for backend in _kernel_backends("attention", qkv, 2, 0.3, 0.0):
        yield pytest.param("attention", backend, id=f"attention-{backend}")
    x = torch.randn(2, 7, 12, device=DEVICE)
    for backend in _kernel_backends("seqpool", x, torch.randn(1, 12), torch.randn(1)):
        yield pytest.param("seqpool", backend, id=f"seqpool-{backend}")


@pytest.mark.parametrize("op,backend", list(_attention_and_seqpool_cases()))
def test_attention_and_seqpool_fakes_match(op, backend):
    if op == "attention":
        qkv, seed = torch.randn(2, 9, 48, device=DEVICE), torch.empty(0, dtype=torch.int64, device=DEVICE)
        forward_args = (qkv, 2, 0.3, 0.0, seed)
        out, lse = torch.ops.cct_kernels.attention_forward(*forward_args, backend)
        backward_args = (torch.randn_like(out), qkv, out, lse, 2, 0.3, 0.0, seed, backend)
    else:
        x, w, b = torch.randn(2, 7, 12, device=DEVICE), torch.randn(1, 12, device=DEVICE), torch.randn(1, device=DEVICE)
        forward_args = (x, w, b)
        out, lse = torch.ops.cct_kernels.seqpool_forward(*forward_args, backend)
        backward_args = (torch.randn_like(out), x, w, b, out, lse, backend)
    forward_op = getattr(torch.ops.cct_kernels, f"{op}_forward")
    torch.library.opcheck(forward_op, (*_with_grad(forward_args), backend))
    torch.library.opcheck(getattr(torch.ops.cct_kernels, f"{op}_backward"), backward_args)


FAMILIES = ("cct_2_3x2_32", "cvt_2_4_32", "vit_lite_2_4_32", "text_cct_2", "text_cvt_2", "text_vit_2",
            "text_transformer_2")
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, stochastic_depth=0.0)  # two runs must draw the same


def _model_and_inputs(family, backend=None):
    """The model (no dropout) and a batch of 2 for it: images, or token ids with lengths (text models)."""
    model = getattr(cct_kernels, family)(backend=backend, **NO_DROPOUT).to(DEVICE)
    inputs, _ = profiling.make_inputs(model, 2, DEVICE, torch.float32)
    return model, inputs


def _compile_cases():
    for family in FAMILIES:
        model, inputs = _model_and_inputs(family)
        for train in (False, True):
            # Kernel backends only: compile of the eager model is tested in test_ops.py, "auto" is one of these.
            for backend in set(backends_serving_model(model, inputs, train=train)) & set(backends.KERNEL_BACKENDS):
                if backend != "triton" or DEVICE.type == "cuda":  # the interpreter is too slow for whole models
                    yield pytest.param(family, train, backend, id=f"{family}-{'train' if train else 'eval'}-{backend}")


@pytest.mark.parametrize("family,train,backend", list(_compile_cases()))
def test_model_compiles_fullgraph_with_inductor(family, train, backend):
    torch._dynamo.reset()  # every model shares forward's code object: keep under dynamo's recompile limit
    model, inputs = _model_and_inputs(family, backend)
    model.train(train)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    expected = model(*inputs)
    out = compiled(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    if train:
        params = [p for p in model.parameters() if p.requires_grad]  # the sine tables are fixed
        grads = torch.autograd.grad(expected.square().sum(), params)
        compiled_grads = torch.autograd.grad(out.square().sum(), params)
        for g, cg in zip(grads, compiled_grads):
            torch.testing.assert_close(cg, g, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", sorted(set(backends.KERNEL_BACKENDS) & set(backends_serving_model(
    cct_kernels.cct_2_3x2_32(), torch.randn(2, 3, 32, 32, device=DEVICE), train=True)) - {"triton"}))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_stochastic_depth_and_dropout_compile_and_match_eager(backend, dropout):
    """Training with stochastic depth and dropout fuses each block's drop mask (ops.linear's row_scale) and the
    dropouts (dropout_p, the seed drawn from torch's generator) into the linears; compiled with inductor drawing the
    same random numbers as eager (fallback_random), the two agree. (inductor's own config.patch: pytest's
    monkeypatch deletes the option on undo here, which hides it from every later compile in the session.)"""
    with torch._inductor.config.patch(fallback_random=True):
        _check_random_training_compiles(backend, dropout)


def _check_random_training_compiles(backend, dropout):
    torch._dynamo.reset()
    model = cct_kernels.cct_2_3x2_32(backend=backend, dropout=dropout, attention_dropout=0.0, stochastic_depth=0.9)
    model = model.to(DEVICE).train()
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    torch.manual_seed(3)
    expected = model(x)
    torch.manual_seed(3)
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    params = list(model.parameters())
    for g, cg in zip(torch.autograd.grad(expected.sum(), params), torch.autograd.grad(out.sum(), params)):
        torch.testing.assert_close(cg, g, rtol=1e-3, atol=1e-4)


def test_backends_serving_model_drops_a_backend_that_refuses_the_mode(monkeypatch):
    """A backend that refuses dropout (like the cuda attention) serves the model in eval mode only."""
    unsupported = backends.unsupported_reason

    def no_dropout_on_cpu(backend, op, device, *inputs):
        if backend == "cpu" and op == "attention" and inputs[3] > 0:
            return "no dropout"
        return unsupported(backend, op, device, *inputs)

    monkeypatch.setattr(backends, "unsupported_reason", no_dropout_on_cpu)
    model, x = cct_kernels.cct_2_3x2_32().eval(), torch.randn(1, 3, 32, 32)
    assert "cpu" in backends_serving_model(model, x, train=False)
    assert "cpu" not in backends_serving_model(model, x, train=True)
    assert not model.training  # the helper restores the mode it found
