"""Backend choice: per call, per model, by context manager, by environment variable; clear refusals."""
import asyncio
import threading

import pytest
import torch

import cct_kernels
from cct_kernels import backends, ops, reference

from tests.cases import KERNEL_BACKENDS_HERE


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


def test_auto_passes_over_a_backend_that_declines_but_a_named_one_still_serves(monkeypatch):
    """A kernel module's optional auto_declines hook is asked by "auto" only: auto takes the next backend, an
    explicit name still gets the declining one (here triton attention on CUDA tensors; select needs only the
    device type)."""
    inputs = (torch.randn(2, 5, 3 * 2 * 64, dtype=torch.bfloat16), 2, 0.125, 0.0, None)
    cuda = torch.device("cuda")
    asked = []
    module = backends.kernel_module("triton", "attention")
    assert backends.select("attention", "auto", cuda, *inputs) == "triton"
    monkeypatch.setattr(module, "auto_declines", lambda *inputs, backend: asked.append(backend) or "slower here",
                        raising=False)
    next_best = "cuda" if backends.unsupported_reason("cuda", "attention", cuda, *inputs) is None else "eager"
    assert backends.select("attention", "auto", cuda, *inputs) == next_best
    assert asked == ["triton"]
    assert backends.select("attention", "triton", cuda, *inputs) == "triton"
    with cct_kernels.use_backend("triton"):
        assert backends.select("attention", None, cuda, *inputs) == "triton"
    assert asked == ["triton"]


def test_auto_leaves_seqpool_to_the_cuda_kernel_or_eager_on_cuda_tensors():
    """The H200 run measured the Triton SeqPool 2-3x slower than the cuda kernel and eager (NOTES.md)."""
    x, w, b = torch.randn(2, 4, 8), torch.randn(1, 8), torch.randn(1)
    cuda = torch.device("cuda")
    assert "H200" in backends.auto_declines("triton", "seqpool", x, w, b)
    next_best = "cuda" if backends.unsupported_reason("cuda", "seqpool", cuda, x, w, b) is None else "eager"
    assert backends.select("seqpool", "auto", cuda, x, w, b) == next_best
    assert backends.select("seqpool", "triton", cuda, x, w, b) == "triton"


def test_model_backend_reaches_every_op_module():
    model = cct_kernels.cct_2_3x2_32(backend="eager")
    op_modules = [m for m in model.modules() if isinstance(m, cct_kernels.nn._backend.UsesBackend)]
    assert len(op_modules) == 2 + 2 + 2 + 1  # two tokenizer stages, two encoder blocks and their attention, SeqPool
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


def _record_backends(monkeypatch):
    """Spy on backends.select: a list of (thread id, chosen backend) for every op call."""
    calls = []
    select = backends.select

    def spy(*args, **kwargs):
        chosen = select(*args, **kwargs)
        calls.append((threading.get_ident(), chosen))
        return chosen

    monkeypatch.setattr(backends, "select", spy)
    return calls


def test_use_backend_is_per_thread(monkeypatch):
    calls = _record_backends(monkeypatch)
    x, w, b = torch.randn(2, 5, 8), torch.randn(1, 8), torch.randn(1)
    names = ["eager", "auto"]  # auto -> cpu where the extension is built, eager otherwise; both run everywhere
    expected = {}
    barrier = threading.Barrier(len(names))
    errors = []

    def worker(name):
        try:
            with cct_kernels.use_backend(name):
                barrier.wait()  # both threads are inside their blocks while the other calls
                for _ in range(300):
                    assert backends.requested_backend() == name
                    ops.seqpool(x, w, b)
            expected[threading.get_ident()] = backends.select("seqpool", name, x.device, x, w, b)
        except Exception as e:  # noqa: BLE001 - reported below with the thread's backend
            errors.append((name, e))

    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    wrong = [(tid, chosen) for tid, chosen in calls if tid in expected and chosen != expected[tid]]
    assert len(calls) >= 600 and not wrong, f"{len(wrong)} wrong-backend calls of {len(calls)}"
    assert backends.requested_backend() == "auto"


def test_use_backend_is_per_asyncio_task():
    x, w, b = torch.randn(2, 5, 8), torch.randn(1, 8), torch.randn(1)

    async def task(name):
        seen = []
        with cct_kernels.use_backend(name):
            for _ in range(200):
                await asyncio.sleep(0)  # lets the other task run inside its own block
                seen.append(backends.requested_backend())
                ops.seqpool(x, w, b)
        return seen

    async def main():
        return await asyncio.gather(task("eager"), task("cpu" if "cpu" in KERNEL_BACKENDS_HERE else "auto"))

    eager_seen, other_seen = asyncio.run(main())
    assert set(eager_seen) == {"eager"}
    assert len(set(other_seen)) == 1 and other_seen[0] != "eager"


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS_HERE, reason="needs the cpu extension (cct_kernels._C)")
def test_compiled_model_follows_use_backend_without_graph_break(monkeypatch):
    torch._dynamo.reset()
    kernel_calls = []
    module = backends.kernel_module("cpu", "seqpool")
    forward = module.forward
    monkeypatch.setattr(module, "forward", lambda *a: kernel_calls.append(1) or forward(*a))
    model = cct_kernels.cct_2_3x2_32().eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(1, 3, 32, 32)
    with cct_kernels.use_backend("eager"):
        eager = compiled(x)
    assert kernel_calls == []
    with cct_kernels.use_backend("cpu"):  # a new choice retraces (dynamo guards on the thread's choice)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-5)
    assert kernel_calls == [1]
    with cct_kernels.use_backend("eager"):  # and the first graph is still right for the first choice
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
    assert kernel_calls == [1]


def test_torch_func_transforms_run_the_eager_reference():
    """grad, vmap and jacrev over a model: "auto" serves them with the eager reference (the kernels' registered ops
    have no torch.func rules), with the same values as the eager model; a named kernel backend refuses, saying why."""
    from torch.func import functional_call, grad, jacrev, vmap

    model = cct_kernels.cct_2_3x2_32().eval()
    official = cct_kernels.cct_2_3x2_32(backend="eager").eval()
    official.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    params = {k: v.detach() for k, v in model.named_parameters()}
    transforms = {
        "grad": lambda m: grad(lambda p: functional_call(m, p, (images,)).sum())(params),
        "vmap": lambda m: {"out": vmap(lambda x: functional_call(m, params, (x[None],)))(images)},
        "jacrev": lambda m: {"jac": jacrev(lambda x: functional_call(m, params, (x,)))(images[:1])},
    }
    for name, transform in transforms.items():
        ours, expected = transform(model), transform(official)
        for key in expected:
            torch.testing.assert_close(ours[key], expected[key], rtol=0, atol=0, msg=f"{name} {key}")
    for backend in KERNEL_BACKENDS_HERE:
        cct_kernels.set_backend(model, backend)
        with pytest.raises(backends.BackendUnavailable, match="torch.func transform .* is active"):
            transforms["grad"](model)
