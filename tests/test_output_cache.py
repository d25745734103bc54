"""The CPU kernels' output cache (csrc/cpu/output_cache.h, cct_kernels.extension.output_cache_stats): large outputs
reuse the blocks of dead outputs, every kernel still writes every element of a reused block, the tensors behave as
any CPU tensor, and CCT_KERNELS_CPU_CACHE_MB is honoured or refused with a clear error."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

from cct_kernels import extension, ops, reference
from tests.cases import run_in_threads

pytestmark = pytest.mark.skipif(extension.load_error() is not None, reason="the C++ extension is not built")

MIB = 1 << 20


def _linear_out(rows, cols):
    """A float32 (rows, cols) output of the cpu linear kernel, i.e. a tensor whose storage the cache owns."""
    return extension.ops().linear_forward(torch.zeros(rows, 8), torch.zeros(cols, 8), None, None, False, False,
                                          None)[0]


def _poison(numel):
    """Leaves a NaN-filled free block of `numel` float32 in the cache, which the next output of that size gets."""
    block = _linear_out(numel // 256, 256)
    block.fill_(float("nan"))
    del block


def test_large_outputs_reuse_freed_blocks():
    first = _linear_out(4096, 256)  # 4 MiB
    before = extension.output_cache_stats()
    assert before["live_bytes"] >= 4 * MIB
    ptr = first.data_ptr()
    del first
    freed = extension.output_cache_stats()
    assert freed["free_bytes"] >= before["free_bytes"] + 4 * MIB and freed["live_bytes"] == before["live_bytes"] - 4 * MIB
    second = _linear_out(4096, 256)
    after = extension.output_cache_stats()
    assert after["hits"] == freed["hits"] + 1 and after["misses"] == freed["misses"]
    assert second.data_ptr() == ptr
    del second
    extension.release_output_cache()
    assert extension.output_cache_stats()["free_bytes"] == 0


def test_small_outputs_bypass_the_cache():
    before = extension.output_cache_stats()
    out = _linear_out(64, 64)  # 16 KiB: torch's allocator
    after = extension.output_cache_stats()
    assert (after["hits"], after["misses"], after["live_bytes"]) == (before["hits"], before["misses"],
                                                                     before["live_bytes"])
    assert out.shape == (64, 64)


def test_reused_blocks_are_fully_overwritten():
    """Each cpu kernel with a cached output, run into a NaN-poisoned block: the result must match float64."""
    torch.manual_seed(0)
    x, w, b, res = torch.randn(2048, 192), torch.randn(512, 192) / 14, torch.randn(512), torch.randn(2048, 512)
    _poison(2048 * 512)
    got = ops.linear(x, w, b, activation="gelu", residual=res, backend="cpu")
    want = reference.linear(x.double(), w.double(), b.double(), activation="gelu", residual=res.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    qkv = torch.randn(8, 128, 3 * 256, requires_grad=True)
    _poison(8 * 128 * 256)
    out = ops.attention(qkv, 4, backend="cpu")
    want = reference.attention(qkv.detach().double(), 4)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    _poison(qkv.numel())
    (gqkv,) = torch.autograd.grad(out, qkv, grad)
    qkv64 = qkv.detach().double().requires_grad_()
    (want_g,) = torch.autograd.grad(reference.attention(qkv64, 4), qkv64, grad.double())
    torch.testing.assert_close(gqkv.double(), want_g, rtol=1e-4, atol=1e-4)

    tokens = torch.randn(16, 128, 256, requires_grad=True)
    weight, bias = torch.randn(1, 256) / 16, torch.zeros(1)
    pooled = ops.seqpool(tokens, weight, bias, backend="cpu")
    _poison(tokens.numel())
    (gx,) = torch.autograd.grad(pooled.sum(), tokens)
    t64 = tokens.detach().double().requires_grad_()
    (want_gx,) = torch.autograd.grad(reference.seqpool(t64, weight.double(), bias.double()).sum(), t64)
    torch.testing.assert_close(gx.double(), want_gx, rtol=1e-5, atol=1e-6)


def test_cached_tensors_behave_as_cpu_tensors(tmp_path):
    out = _linear_out(2048, 256)
    out.copy_(torch.arange(out.numel(), dtype=torch.float32).view_as(out))
    expected = out.clone()
    assert torch.equal(pickle.loads(pickle.dumps(out)), expected)
    torch.save(out, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt"), expected)
    out.resize_(4096, 256)  # storage grows through the cache's allocator; the first rows are kept
    assert torch.equal(out[:2048], expected)
    assert out.share_memory_().is_shared() and torch.equal(out[:2048], expected)


def _run_with_cache_env(value, code):
    env = dict(os.environ, CCT_KERNELS_CPU_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


_TWO_OUTPUTS = """
import torch
from cct_kernels import extension
for _ in range(2):
    extension.ops().linear_forward(torch.zeros(4096, 8), torch.zeros(256, 8), None, None, False, False, None)
print(extension.output_cache_stats())
"""


def test_cache_can_be_turned_off_and_bad_values_are_refused():
    off = _run_with_cache_env("0", _TWO_OUTPUTS)
    assert off.returncode == 0, off.stderr
    assert "'hits': 0, 'misses': 0" in off.stdout and "'free_bytes': 0" in off.stdout
    on = _run_with_cache_env("64", _TWO_OUTPUTS)
    assert on.returncode == 0, on.stderr
    assert "'hits': 1, 'misses': 1" in on.stdout
    bad = _run_with_cache_env("lots", _TWO_OUTPUTS)
    assert bad.returncode != 0 and "CCT_KERNELS_CPU_CACHE_MB must be a whole number of MiB >= 0, got 'lots'" in bad.stderr


def test_threads_share_the_cache_safely():
    """Four threads allocate and free cached outputs at once (the free list is shared): every result stays right."""
    torch.manual_seed(0)
    inputs = [(torch.randn(1024 + 64 * i, 256), torch.randn(512, 256) / 16) for i in range(4)]
    expected = [x @ w.t() for x, w in inputs]
    errors = []

    def work(i):
        x, w = inputs[i]
        for _ in range(30):
            out = ops.linear(x, w, backend="cpu")
            if not torch.allclose(out, expected[i], rtol=1e-4, atol=1e-4):
                errors.append(i)

    run_in_threads(work, 4)
    assert not errors
    stats = extension.output_cache_stats()
    assert stats["live_bytes"] >= 0 and stats["free_bytes"] >= 0


def test_torch_profiler_counts_cached_outputs():
    """profiling.allocated_bytes (torch.profiler's memory events) sees the cached outputs as any CPU tensor."""
    from cct_kernels import profiling

    x, w = torch.randn(4096, 256), torch.randn(512, 256)
    _linear_out(4096, 512)  # a free block of that size: the measured call reuses it and must still count it
    counted = profiling.allocated_bytes(lambda: ops.linear(x, w, backend="cpu"), torch.device("cpu"))
    assert counted >= 4096 * 512 * 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_uses_the_cache():
    """A child forked after the parent used the cache (as DataLoader workers are) allocates from it and exits. The
    child runs one thread, as DataLoader workers do: the parent's OpenMP threads do not survive fork (an ATen matmul
    hangs there too otherwise); a hang ends at the alarm, as a failure."""
    import signal

    first = _linear_out(4096, 256)
    del first  # a free block the child inherits
    pid = os.fork()
    if pid == 0:  # the child: run a cached kernel, report through the exit status only
        try:
            signal.alarm(60)
            torch.set_num_threads(1)
            out = _linear_out(4096, 256)
            os._exit(0 if out.shape == (4096, 256) and extension.output_cache_stats()["hits"] >= 1 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
