"""Drop-in use: autocast, torch.compile modes, CUDA graphs, channels_last, no_grad/inference_mode,
deepcopy/pickle, state_dict round trips, torch.export of the eager backend."""
import copy
import io
import pickle

import pytest
import torch

import cct_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def small_model(backend=None):
    return cct_kernels.cct_2_3x2_32(backend=backend).to(DEVICE).eval()


def images(batch=2):
    return torch.randn(batch, 3, 32, 32, device=DEVICE)


def _forward_backward(model, x, autocast_dtype=None):
    """Output and parameter gradients of model(x).float().square().sum(), under autocast when a dtype is given."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(x)
        loss = out.float().square().sum()
    loss.backward()
    return out, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_autocast(dtype, backend):
    """Under autocast the model computes in `dtype` and is as close to the float64 model (output and every
    gradient) as the eager model under the same autocast: at most 2x its error plus one ulp of the scale."""
    model, x = small_model(backend), images()
    with torch.no_grad():  # attention logits of order 1, not the ~0 of initialisation: the softmax must matter
        for name, p in model.named_parameters():
            if name.endswith("qkv.weight"):
                p.mul_(4)
    eager = copy.deepcopy(model).double()
    exact, exact_grads = _forward_backward(eager, x.double())
    eager.float().set_backend("eager")
    eager_out, eager_grads = _forward_backward(eager, x, dtype)
    out, grads = _forward_backward(model, x, dtype)
    assert out.dtype == dtype
    eps = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    named = zip(["output"] + [n for n, _ in model.named_parameters()], [out] + grads, [eager_out] + eager_grads,
                [exact] + exact_grads)
    largest = max(g.abs().max().item() for g in exact_grads)
    for name, got, bar, ref in named:
        scale = ref.abs().max().item()
        if name.endswith("attention_pool.bias"):  # 0 in exact arithmetic (softmax ignores a shared bias): noise
            scale = largest
        err, bar_err = (got.double() - ref).abs().max().item(), (bar.double() - ref).abs().max().item()
        assert err <= 2 * bar_err + eps * scale, f"{name}: error {err:.3g}, eager autocast error {bar_err:.3g}"


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs" if DEVICE.type == "cpu" else "max-autotune"])
def test_compile_modes(mode):
    torch._dynamo.reset()
    model, x = small_model(), images()
    torch.testing.assert_close(torch.compile(model, fullgraph=True, mode=mode)(x), model(x), rtol=2e-4, atol=2e-5)


def test_channels_last_and_non_contiguous_inputs():
    model, x = small_model(), images()
    expected = model(x)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-5, atol=1e-5)
    wide = torch.randn(2, 3, 32, 64, device=DEVICE)[..., ::2]
    torch.testing.assert_close(model(wide), model(wide.contiguous()), rtol=1e-5, atol=1e-5)


def test_no_grad_and_inference_mode():
    model, x = small_model(), images()
    expected = model(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected)


def test_deepcopy_pickle_and_state_dict_round_trip():
    model, x = small_model(backend="eager"), images()
    expected = model(x)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), expected)
    assert clone.classifier.backend == "eager"
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(restored(x), expected)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = small_model()
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    torch.testing.assert_close(fresh(x), expected)


def test_torch_export_of_the_eager_backend():
    model, x = small_model(backend="eager"), images()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    other = images(batch=2)
    torch.testing.assert_close(exported.module()(other), model(other))


if DEVICE.type == "cuda":  # a GPU-only feature: collected only where a GPU is

    def test_cuda_graph_capture_for_inference():
        model, x = small_model(), images(8)
        static = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                model(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            out = model(static)
        static.copy_(images(8))
        graph.replay()
        with torch.inference_mode():
            torch.testing.assert_close(out, model(static))
