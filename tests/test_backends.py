"""Backend choice: per call, per model, by context manager, by environment variable; clear refusals."""
import pytest
import torch

import cct_kernels
from cct_kernels import backends, ops, reference


def test_precedence_explicit_then_context_then_env(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    assert backends.requested_backend() == "cpu"
    with cct_kernels.use_backend("triton"):
        assert backends.requested_backend() == "triton"
        with cct_kernels.use_backend("eager"):
            assert backends.requested_backend() == "eager"
        assert backends.requested_backend() == "triton"
        assert backends.requested_backend("cuda") == "cuda"
    monkeypatch.delenv(backends.ENV_VAR)
    assert backends.requested_backend() == "auto"


def test_unknown_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with cct_kernels.use_backend("fast"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.seqpool(torch.randn(1, 4, 8), torch.randn(1, 8), torch.randn(1))


def test_explicit_backend_that_cannot_serve_says_why():
    x = torch.randn(2, 4, 8)
    with pytest.raises(backends.BackendUnavailable, match="backend 'cuda' cannot run seqpool: .*CUDA"):
        ops.seqpool(x, torch.randn(1, 8), torch.randn(1), backend="cuda")


def test_auto_on_cpu_picks_the_cpu_extension_or_eager():
    x = torch.randn(2, 4, 8)
    chosen = backends.select("seqpool", "auto", x.device, x, torch.randn(1, 8), torch.randn(1))
    expected = "cpu" if backends.unsupported_reason("cpu", "seqpool", x.device, x, torch.randn(1, 8),
                                                    torch.randn(1)) is None else "eager"
    assert chosen == expected
    assert backends.select("seqpool", "eager", x.device, x) == "eager"


def test_model_backend_reaches_every_op_module():
    model = cct_kernels.cct_2_3x2_32(backend="eager")
    op_modules = [m for m in model.modules() if isinstance(m, cct_kernels.nn._backend.UsesBackend)]
    assert len(op_modules) == 2 + 2 + 1  # two tokenizer stages, two attention layers, SeqPool
    assert all(m.backend == "eager" for m in op_modules)
    model.set_backend(None)
    assert all(m.backend is None for m in op_modules)


def test_context_manager_switches_a_model_without_backend():
    model = cct_kernels.cct_2_3x2_32().eval()
    x = torch.randn(1, 3, 32, 32)
    with cct_kernels.use_backend("eager"):
        eager = model(x)
    with pytest.raises(backends.BackendUnavailable):
        with cct_kernels.use_backend("cuda"):
            model(x)
    torch.testing.assert_close(model(x), eager, rtol=1e-4, atol=1e-5)


def test_eager_ops_are_the_reference():
    x, w, b = torch.randn(2, 5, 8), torch.randn(1, 8), torch.randn(1)
    assert torch.equal(ops.seqpool(x, w, b, backend="eager"), reference.seqpool(x, w, b))
    qkv = torch.randn(2, 5, 3 * 16)
    assert torch.equal(ops.attention(qkv, 2, backend="eager"), reference.attention(qkv, 2))
    img, conv = torch.randn(1, 3, 9, 9), torch.randn(4, 3, 3, 3)
    assert torch.equal(ops.tokenize(img, conv, stride=1, padding=1, backend="eager"),
                       reference.tokenize(img, conv, stride=1, padding=1))
