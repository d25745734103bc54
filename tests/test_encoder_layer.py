"""ops.encoder_layer (the CCT encoder block as one op) and ops.encoder_layers (blocks in sequence): against float64
on every backend here, the fused cpu kernel bitwise equal to the op-by-op block, the stack equal to its blocks one
after another, the training block (one autograd node) bitwise equal to the op-by-op block in
outputs and gradients, the fake (opcheck), torch.compile over it, the routing of gradient / mask / hook cases, and
the input errors."""
import importlib

import pytest
import torch

import cct_kernels
from cct_kernels import backends, ops
from tests.cases import DEVICE, assert_close_to_reference

BLOCK_OP = importlib.import_module("cct_kernels.ops.encoder_layer")
KERNEL_BACKENDS_HERE = [b for b in ("cpu", "triton", "cuda") if backends.availability(DEVICE)[b] is None]

FUSED_HERE = backends.unsupported_reason("cpu", "encoder_layer", torch.device("cpu"), torch.randn(1, 2, 4),
                                         None) is None
BACKENDS_HERE = ["eager", "auto"] + (["cpu"] if FUSED_HERE else [])
NEEDS_FUSED = pytest.mark.skipif(not FUSED_HERE, reason="the cpu extension is not built")
NAMES = ("pre_norm_weight", "pre_norm_bias", "qkv_weight", "proj_weight", "proj_bias", "norm1_weight", "norm1_bias",
         "linear1_weight", "linear1_bias", "linear2_weight", "linear2_bias")


def _block(dim=32, heads=4, hidden=48, batch=3, tokens=10, seed=0, device=DEVICE):
    """src and the block's parameters in float64, O(1) activations (weights scaled by 1 / sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    params = dict(zip(NAMES, (
        1 + rand(dim, scale=0.1), rand(dim, scale=0.1), rand(3 * dim, dim, scale=dim**-0.5),
        rand(dim, dim, scale=dim**-0.5), rand(dim, scale=0.1), 1 + rand(dim, scale=0.1), rand(dim, scale=0.1),
        rand(hidden, dim, scale=dim**-0.5), rand(hidden, scale=0.1), rand(dim, hidden, scale=hidden**-0.5),
        rand(dim, scale=0.1))))
    return rand(batch, tokens, dim), params


def _run(src, params, dtype, **kwargs):
    cast = {k: v.to(dtype) for k, v in params.items()}
    return ops.encoder_layer(src.to(dtype), num_heads=4, **cast, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_encoder_layer_against_float64(backend, dtype):
    src, params = _block()
    with torch.no_grad():
        ref64 = _run(src, params, torch.float64, backend="eager")
        eager = _run(src, params, dtype, backend="eager")
        out = _run(src, params, dtype, backend=backend)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close_to_reference(out, ref64, eager, name=f"encoder_layer {backend} {dtype}")


@NEEDS_FUSED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_block_is_the_op_by_op_block_to_the_bit(dtype):
    src, params = _block(device=torch.device("cpu"))
    with torch.no_grad():
        fused = _run(src, params, dtype, backend="cpu")
    src_grad = src.to(dtype).requires_grad_()  # a gradient to record: the op runs the block op by op
    op_by_op = ops.encoder_layer(src_grad, num_heads=4, **{k: v.to(dtype) for k, v in params.items()},
                                 backend="cpu")
    assert op_by_op.grad_fn is not None
    assert torch.equal(fused, op_by_op.detach())


@NEEDS_FUSED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_layer_fake_matches(dtype):
    src, params = _block(device=torch.device("cpu"))
    args = (src.to(dtype), *(params[n].to(dtype) for n in NAMES), 4, 32**-0.5 / 2, 1e-5, 1e-6)
    torch.library.opcheck(torch.ops.cct_kernels_C.encoder_layer_forward, args)


@NEEDS_FUSED
def test_model_compiles_over_the_fused_block():
    """Inference under torch.compile(fullgraph=True): the blocks are the extension's C++ op in the graph (one call
    for the stack), called by inductor's code directly (no Python kernel in between)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = cct_kernels.cct_2_3x2_32(backend="cpu").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        out, code = run_and_get_code(compiled, images)
    assert "".join(code).count("torch.ops.cct_kernels_C.encoder_layers_forward.default(") == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@NEEDS_FUSED
def test_gradient_mask_and_autocast_run_op_by_op(monkeypatch):
    from cct_kernels.extension import encoder_layer as kernel

    monkeypatch.setattr(kernel, "forward", lambda *args: pytest.fail("the fused kernel ran"))
    src, params = _block(device=torch.device("cpu"))
    params = {k: v.float() for k, v in params.items()}
    src = src.float()
    mask = torch.ones(src.shape[:2], dtype=torch.bool)
    mask[0, 7:] = False
    masked = ops.encoder_layer(src, num_heads=4, mask=mask, backend="cpu", **params)
    reference = ops.encoder_layer(src, num_heads=4, mask=mask, backend="eager", **params)
    torch.testing.assert_close(masked, reference, rtol=1e-5, atol=1e-5)
    weight = params["linear2_weight"].requires_grad_()
    out = ops.encoder_layer(src, num_heads=4, backend="cpu", **params)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    assert grad.shape == weight.shape and torch.isfinite(grad).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ops.encoder_layer(src, num_heads=4, backend="cpu", **{k: v.detach() for k, v in params.items()})


@NEEDS_FUSED
def test_block_with_hooked_norm_runs_op_by_op(monkeypatch):
    """A forward hook on a block's LayerNorm still fires in eval mode (the fused op would skip the module call)."""
    from cct_kernels.extension import encoder_layer as kernel

    calls = []
    real_forward, real_layers = kernel.forward, kernel.forward_layers
    monkeypatch.setattr(kernel, "forward", lambda *args: calls.append("block") or real_forward(*args))
    monkeypatch.setattr(kernel, "forward_layers", lambda *args: calls.append("stack") or real_layers(*args))
    model = cct_kernels.cct_2_3x2_32(backend="cpu").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(images)
        assert calls == ["stack"]
        seen = []
        handle = model.classifier.blocks[0].norm1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        hooked = model(images)
        handle.remove()
    # the blocks called one by one: block 0 op by op, block 1 fused
    assert seen == [torch.Size([2, 64, 128])] and calls == ["stack", "block"]
    # the hooked norm1 runs as its module (ATen's LayerNorm), not in proj's epilogue: equal up to float32 rounding
    torch.testing.assert_close(hooked, fused, rtol=1e-5, atol=1e-5)


def test_encoder_layer_errors_name_the_argument():
    src, params = _block(device=torch.device("cpu"))
    src, params = src.float(), {k: v.float() for k, v in params.items()}
    with pytest.raises(ValueError, match="src must have 3 dimensions"):
        ops.encoder_layer(src[0], num_heads=4, **params)
    with pytest.raises(ValueError, match="num_heads \\(5\\) must divide src's last dim D = 32"):
        ops.encoder_layer(src, num_heads=5, **params)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        ops.encoder_layer(src, num_heads=4.0, **params)
    for name, wrong in (("qkv_weight", torch.zeros(32, 32)), ("linear2_weight", torch.zeros(32, 47)),
                        ("norm1_bias", torch.zeros(31)), ("linear1_bias", torch.zeros(47))):
        with pytest.raises(ValueError, match=f"{name} must have shape"):
            ops.encoder_layer(src, num_heads=4, **{**params, name: wrong})
    with pytest.raises(TypeError, match="proj_bias has dtype torch.float64 but src has dtype torch.float32"):
        ops.encoder_layer(src, num_heads=4, **{**params, "proj_bias": params["proj_bias"].double()})
    with pytest.raises(ValueError, match="scale must be positive"):
        ops.encoder_layer(src, num_heads=4, scale=-1.0, **params)
    with pytest.raises(ValueError, match="norm1_eps must be positive"):
        ops.encoder_layer(src, num_heads=4, norm1_eps=0.0, **params)
    with pytest.raises(ValueError, match="backend"):
        ops.encoder_layer(src, num_heads=4, backend="tpu", **params)


@NEEDS_FUSED
def test_model_calls_its_blocks_where_one_is_hooked_or_on_another_backend(monkeypatch):
    """The classifier runs its blocks as one encoder_layers call only where that is calling them: a hook on a block
    fires, and a block set to another backend runs on it."""
    from cct_kernels.extension import encoder_layer as kernel

    stacks = []
    real_layers = kernel.forward_layers
    monkeypatch.setattr(kernel, "forward_layers", lambda *args: stacks.append(1) or real_layers(*args))
    model = cct_kernels.cct_2_3x2_32(backend="cpu").eval()
    images = torch.randn(2, 3, 32, 32)
    blocks = model.classifier.blocks
    with torch.no_grad():
        expected = model(images)
        seen = []
        handle = blocks[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert torch.equal(model(images), expected) and seen == [torch.Size([2, 64, 128])]
        handle.remove()
        blocks[0].backend = "eager"
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    assert len(stacks) == 1


def _layers(count=3, **per_layer):
    """src (float32, cpu) and `count` layers of encoder_layer's arguments: different weights, heads and eps per
    layer, plus per_layer's arguments."""
    src, _ = _block(device=torch.device("cpu"))
    layers = []
    for i in range(count):
        _, params = _block(seed=10 + i, device=torch.device("cpu"))
        layers.append({**{k: v.float() for k, v in params.items()}, "num_heads": (4, 2, 8)[i % 3],
                       "norm1_eps": 1e-5 * (i + 1), **per_layer})
    return src.float(), layers


def _one_by_one(src, layers, **kwargs):
    for layer in layers:
        src = ops.encoder_layer(src, **layer, **kwargs)
    return src


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_encoder_layers_are_the_blocks_one_after_another_to_the_bit(backend, monkeypatch):
    from cct_kernels.extension import encoder_layer as kernel

    stacks = []
    if FUSED_HERE:
        real_layers = kernel.forward_layers
        monkeypatch.setattr(kernel, "forward_layers", lambda *args: stacks.append(1) or real_layers(*args))
    src, layers = _layers()
    with torch.no_grad():
        expected = _one_by_one(src, layers, backend=backend)
        out = ops.encoder_layers(src, layers, backend=backend)
    assert torch.equal(out, expected)
    assert len(stacks) == (backend in ("cpu", "auto"))  # one C++ call for the three blocks where fused
    assert ops.encoder_layers(src, [], backend=backend) is src


@NEEDS_FUSED
def test_encoder_layers_with_gradient_dropout_or_mask_run_block_by_block(monkeypatch):
    """What the fused kernel does not serve runs each block as encoder_layer would: the same random draws, the
    same autograd graph."""
    from cct_kernels.extension import encoder_layer as kernel

    monkeypatch.setattr(kernel, "forward_layers", lambda *args: pytest.fail("the fused stack ran"))
    src, layers = _layers(dropout_p=0.1, attention_dropout_p=0.1, drop_path_rate=0.2)
    torch.manual_seed(3)
    out = ops.encoder_layers(src, layers, backend="cpu")
    torch.manual_seed(3)
    expected = _one_by_one(src, layers, backend="cpu")
    assert torch.equal(out, expected)
    src, layers = _layers()
    weight = layers[1]["linear1_weight"].requires_grad_()
    (grad,) = torch.autograd.grad(ops.encoder_layers(src, layers, backend="cpu").sum(), weight)
    (expected,) = torch.autograd.grad(_one_by_one(src, layers, backend="cpu").sum(), weight)
    assert torch.equal(grad, expected)
    lengths = torch.tensor([10, 4, 7])
    with torch.no_grad():
        masked = ops.encoder_layers(src, layers, mask=lengths, backend="cpu")
        assert torch.equal(masked, _one_by_one(src, layers, mask=lengths, backend="cpu"))


@NEEDS_FUSED
def test_encoder_layers_work_out_mask_and_backends_once(monkeypatch):
    """In training the blocks of one encoder_layers call that share shapes and attention arguments share one backend
    selection (5 select calls, not 5 per block; blocks that differ get their own), and the mask is checked once (a
    host sync for a CUDA mask)."""
    selected, paddings = [], []
    real_padding = BLOCK_OP.key_padding
    monkeypatch.setattr(BLOCK_OP, "key_padding", lambda *args: paddings.append(1) or real_padding(*args))
    real_select = backends.select
    monkeypatch.setattr(backends, "select", lambda *args, **kwargs: selected.append(args[0])
                        or real_select(*args, **kwargs))
    src, layers = _layers(count=4)
    alike = [{**layer, "num_heads": 4, "norm1_eps": 1e-5, "dropout_p": 0.1} for layer in layers]
    weight = layers[2]["qkv_weight"].requires_grad_()  # shared by alike[2]: a gradient to record
    torch.manual_seed(4)
    out = ops.encoder_layers(src, alike, backend="cpu")
    assert len(selected) == 5
    torch.manual_seed(4)
    expected = _one_by_one(src, alike, backend="cpu")
    assert torch.equal(out, expected)
    assert torch.equal(*(torch.autograd.grad(y.sum(), weight)[0] for y in (out, expected)))
    selected.clear()
    ops.encoder_layers(src, layers, backend="cpu")  # heads 4, 2, 8, 4: three kinds of block
    assert len(selected) == 15
    mask = torch.arange(src.shape[1]) < torch.tensor([10, 4, 7])[:, None]  # a prefix: served as lengths
    paddings.clear()
    torch.manual_seed(5)
    out = ops.encoder_layers(src, alike, mask=mask, backend="cpu")
    assert len(paddings) == 1
    torch.manual_seed(5)
    assert torch.equal(out, _one_by_one(src, alike, mask=mask, backend="cpu"))


@NEEDS_FUSED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_layers_fake_matches(dtype):
    src, layers = _layers(count=2)
    args = (src.to(dtype), [layer[n].to(dtype) for layer in layers for n in NAMES], [4, 2], [0.25, 0.5],
            [1e-5, 1e-5], [1e-5, 1e-6])
    torch.library.opcheck(torch.ops.cct_kernels_C.encoder_layers_forward, args)


def test_encoder_layers_errors_name_the_layer():
    src, layers = _layers()
    with pytest.raises(TypeError, match="layers must be a list or tuple"):
        ops.encoder_layers(src, iter(layers))
    with pytest.raises(TypeError, match="layers\\[1\\] must be a dict"):
        ops.encoder_layers(src, [layers[0], list(layers[1].values())])
    with pytest.raises(ValueError, match="layers\\[2\\]: qkv_weight must have shape"):
        ops.encoder_layers(src, [*layers[:2], {**layers[2], "qkv_weight": torch.zeros(32, 32)}])
    with pytest.raises(ValueError, match="layers\\[0\\]: num_heads \\(5\\) must divide"):
        ops.encoder_layers(src, [{**layers[0], "num_heads": 5}])
    with pytest.raises(TypeError, match="layers\\[0\\]: .*unexpected keyword argument 'mask'"):
        ops.encoder_layers(src, [{**layers[0], "mask": None}])
    with pytest.raises(ValueError, match="src must have 3 dimensions"):
        ops.encoder_layers(src[0], layers)


UPSTREAM_OF_ATTENTION = ("src", "pre_norm_weight", "pre_norm_bias", "qkv_weight")


def _training_call(src, params, backend, rates, mask=None, op_by_op=False, seed=5):
    """The block with dropout and stochastic depth at `rates` (attention, dropout, drop path), from torch seed `seed`:
    through ops.encoder_layer, or (op_by_op) through the ops one by one."""
    torch.manual_seed(seed)
    if op_by_op:
        config = BLOCK_OP._Config(4, (src.shape[-1] // 4) ** -0.5, 1e-5, 1e-5, *rates)
        return BLOCK_OP._op_by_op(src, params, config, mask, backend)
    attention_dropout_p, dropout_p, drop_path_rate = rates
    return ops.encoder_layer(src, num_heads=4, **params, mask=mask, attention_dropout_p=attention_dropout_p,
                             dropout_p=dropout_p, drop_path_rate=drop_path_rate, backend=backend)


def _assert_same_gradients(backend, names, mine, theirs):
    """Equal to the bit, except upstream of the cuda attention backward, which sums dQ with float32 atomics (their
    order, so the last bits, vary from run to run)."""
    for name, a, b in zip(names, mine, theirs):
        if backend == "cuda" and name in UPSTREAM_OF_ATTENTION:
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
        else:
            assert torch.equal(a, b), name


def _with_gradients(backend):
    """src and parameters for `backend` (the cuda kernels: bfloat16, head dim 64), requiring gradients."""
    dtype, dim = (torch.bfloat16, 256) if backend == "cuda" else (torch.float32, 32)
    src, params = _block(dim=dim)
    return src.to(dtype).requires_grad_(), {k: v.to(dtype).requires_grad_() for k, v in params.items()}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_HERE)
@pytest.mark.parametrize("rates", [(0.0, 0.0, 0.0), (0.1, 0.2, 0.3)], ids=["eval", "dropout"])
@pytest.mark.parametrize("masked", [False, True])
def test_training_block_is_one_node_equal_to_the_op_by_op_block(backend, rates, masked):
    """The same kernels, draws and backward formulas: output and every gradient equal to the bit."""
    if backend != "cpu":
        # the cuda attention kernel has no dropout; triton's takes ~25 s a call in the interpreter (its own tests
        # cover it); the cpu backend checks the attention seed's place among the draws
        rates = (0.0, *rates[1:])
    src, params = _with_gradients(backend)
    mask = torch.tensor([10, 7, 1], device=DEVICE) if masked else None
    out = _training_call(src, params, backend, rates, mask)
    assert type(out.grad_fn).__name__ == "_BlockFunctionBackward"
    expected = _training_call(src, params, backend, rates, mask, op_by_op=True)
    assert type(expected.grad_fn).__name__ != "_BlockFunctionBackward"
    assert torch.equal(out, expected)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    inputs = (src, *params.values())
    names = ("src", *params)
    _assert_same_gradients(backend, names, torch.autograd.grad((out * weights).sum(), inputs),
                           torch.autograd.grad((expected * weights).sum(), inputs))
    with torch.no_grad():  # no gradient to record: the same kernels, no autograd node
        assert torch.equal(_training_call(src, params, backend, rates, mask), expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_HERE)
def test_training_block_under_autocast_equals_the_op_by_op_block(backend):
    """float32 src and parameters under torch.autocast (bfloat16): the block casts them as the ops do (src once per
    use), so output and gradients (summed in float32 for src) equal the op-by-op block's."""
    src, params = _with_gradients(backend)
    src, params = src.detach().float().requires_grad_(), {k: v.detach().float().requires_grad_()
                                                          for k, v in params.items()}
    rates = (0.1 if backend == "cpu" else 0.0, 0.2, 0.3)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = _training_call(src, params, backend, rates)
        expected = _training_call(src, params, backend, rates, op_by_op=True)
    assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ == "_BlockFunctionBackward"
    assert torch.equal(out, expected)
    inputs = (src, *params.values())
    grads = torch.autograd.grad(out.float().square().sum(), inputs)
    assert all(g.dtype == torch.float32 for g in grads)
    _assert_same_gradients(backend, ("src", *params), grads,
                           torch.autograd.grad(expected.float().square().sum(), inputs))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_HERE)
def test_training_block_takes_non_contiguous_parameters(backend):
    """A transposed-view parameter is served as the ops serve it (made contiguous before the backends are chosen:
    the triton linear takes contiguous weights only)."""
    src, params = _with_gradients(backend)
    params["linear1_weight"] = params["linear1_weight"].detach().t().contiguous().t().requires_grad_()
    out = _training_call(src, params, backend, (0.0, 0.1, 0.1))
    assert type(out.grad_fn).__name__ == "_BlockFunctionBackward"
    assert torch.equal(out, _training_call(src, params, backend, (0.0, 0.1, 0.1), op_by_op=True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_HERE)
def test_training_block_checks_inputs_and_refuses_double_backward(backend):
    src, params = _with_gradients(backend)
    out = _training_call(src, params, backend, (0.0, 0.1, 0.1))
    with torch.no_grad():
        params["linear1_weight"].mul_(2)  # as an optimizer step between forward and backward would
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    out = _training_call(src, params, backend, (0.0, 0.1, 0.1))
    (grad,) = torch.autograd.grad(out.square().sum(), src, create_graph=True)
    with pytest.raises(RuntimeError, match='run this op with backend="eager"'):
        grad.sum().backward()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_HERE)
def test_training_stack_equals_its_blocks_one_after_another(backend):
    """encoder_layers in training (dropout, stochastic depth, key padding) on each kernel backend: the backend
    selection and mask check its blocks share change nothing; output and gradients equal encoder_layer's block after
    block (on cuda the gradients within a tolerance: every block is upstream of a later one's attention backward,
    whose float32 atomics vary in their last bits)."""
    rates = (0.1 if backend == "cpu" else 0.0, 0.2, 0.3)  # the cuda attention has no dropout; triton's is slow here
    dtype, dim = (torch.bfloat16, 256) if backend == "cuda" else (torch.float32, 32)
    src = _block(dim=dim)[0].to(dtype).requires_grad_()
    layers = [{**{k: v.to(dtype).requires_grad_() for k, v in _block(dim=dim, seed=1 + i)[1].items()},
               "num_heads": 4, "attention_dropout_p": rates[0], "dropout_p": rates[1], "drop_path_rate": rates[2]}
              for i in range(3)]
    mask = torch.tensor([10, 7, 1], device=DEVICE)
    torch.manual_seed(7)
    out = ops.encoder_layers(src, layers, mask=mask, backend=backend)
    torch.manual_seed(7)
    expected = _one_by_one(src, layers, mask=mask, backend=backend)
    assert torch.equal(out, expected)
    inputs = [src, *(layer[name] for layer in layers for name in NAMES)]
    for a, b in zip(torch.autograd.grad(out.float().square().sum(), inputs),
                    torch.autograd.grad(expected.float().square().sum(), inputs)):
        if backend == "cuda":
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
        else:
            assert torch.equal(a, b)


def test_training_block_routes_what_its_kernels_cannot_serve_op_by_op():
    """eager by name, and a bool mask that is not a prefix of each sequence (attention then runs eager), take the ops
    one by one; the values agree with the kernel path where both can serve."""
    src, params = _with_gradients("auto")
    out = _training_call(src, params, "eager", (0.0, 0.0, 0.1))
    assert type(out.grad_fn).__name__ != "_BlockFunctionBackward"
    mask = torch.ones(3, 10, dtype=torch.bool, device=DEVICE)
    mask[1, 2] = False
    out = _training_call(src, params, "auto", (0.0, 0.0, 0.0), mask=mask)
    assert type(out.grad_fn).__name__ != "_BlockFunctionBackward"
    torch.testing.assert_close(out, _training_call(src, params, "eager", (0.0, 0.0, 0.0), mask=mask),
                               rtol=1e-5, atol=1e-5)


def test_training_rates_are_checked():
    src, params = _block(device=torch.device("cpu"))
    src, params = src.float(), {k: v.float() for k, v in params.items()}
    for name, rate, message in (("attention_dropout_p", 1.0, "in \\[0, 1\\)"), ("dropout_p", -0.1, "in \\[0, 1\\]"),
                                ("drop_path_rate", 1.5, "in \\[0, 1\\]")):
        with pytest.raises(ValueError, match=f"{name} must be .*{message}"):
            ops.encoder_layer(src, num_heads=4, **params, **{name: rate})
    with pytest.raises(TypeError, match="dropout_p"):
        ops.encoder_layer(src, num_heads=4, **params, dropout_p="0.1")
