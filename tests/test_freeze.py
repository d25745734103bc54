"""cct_kernels.freeze (csrc/cpu/frozen_weights.h): a frozen model computes what the unfrozen one does, with its linear
weights packed once per row count and its convolution weights copied once; updates through the version counter
are seen, freed weights leave the registry, bad weights are refused."""
import gc

import pytest
import torch
import torch.nn.functional as F

import cct_kernels
from cct_kernels import extension, ops
from cct_kernels.extension import frozen
from cct_kernels.nn.freeze import freezable_weights
from tests.cases import run_in_threads

pytestmark = pytest.mark.skipif(extension.load_error() is not None, reason="the C++ extension is not built")

# an image model with the 7x7 stem's two stages, one with one 3x3 stage, and a text model
FAMILIES = {
    "cct_2_3x2_32": lambda: cct_kernels.cct_2_3x2_32(num_classes=10, backend="cpu"),
    "cct_7x2": lambda: cct_kernels.CCT(img_size=64, embedding_dim=64, n_conv_layers=2, kernel_size=7, num_layers=2,
                                        num_heads=2, mlp_ratio=2, num_classes=5, backend="cpu"),
    "text_cct_2": lambda: cct_kernels.text_cct_2(vocab_size=50, num_classes=3, backend="cpu"),
}


def _inputs(name, batch):
    torch.manual_seed(1)
    if name.startswith("text"):
        return (torch.randint(0, 50, (batch, 64)),)
    size = 64 if name == "cct_7x2" else 32
    return (torch.randn(batch, 3, size, size),)


def _linear_weights(model):
    return [w for w in freezable_weights(model) if w.dim() == 2]


def _expected_weights(model):
    """How many of model's weights freeze keeps: its convolution weights, and its linear weights with MKL's packed
    GEMM (x86-64 torch wheels)."""
    weights = freezable_weights(model)
    return sum(w.dim() == 4 or frozen.has_packed_gemm() for w in weights)


@pytest.mark.parametrize("name", FAMILIES)
def test_frozen_model_equals_the_unfrozen_one(name):
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    before = frozen.stats()
    with torch.inference_mode():
        for batch in (1, 3):
            x = _inputs(name, batch)
            expected = model(*x)
            cct_kernels.freeze(model)
            assert frozen.stats()["weights"] == before["weights"] + _expected_weights(model)
            torch.testing.assert_close(model(*x), expected, rtol=1e-5, atol=1e-5)
            cct_kernels.unfreeze(model)
    assert frozen.stats()["weights"] == before["weights"]


def test_packed_copies_are_made_per_row_count_and_capped():
    if not frozen.has_packed_gemm():
        pytest.skip("this torch has no MKL packed GEMM: linear weights are not frozen")
    torch.manual_seed(0)
    w, b = torch.randn(48, 32), torch.randn(48)
    frozen.freeze([w])
    start = frozen.stats()["packed"]
    # 5 and 7, 5 again (no new copy), 9, 11, then 13 evicts the least recent (7): four row counts at most; more
    # than 4096 rows read the weight unpacked
    for rows, copies in ((5, 1), (7, 2), (5, 2), (9, 3), (11, 4), (13, 4), (7, 4), (4097, 4)):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(ops.linear(x, w, b, backend="cpu"), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert frozen.stats()["packed"] == start + copies
    frozen.unfreeze([w])
    assert frozen.stats()["packed"] == start  # the copies went with the entry


def test_in_place_updates_are_seen_and_data_writes_need_freezing_again():
    torch.manual_seed(0)
    model = FAMILIES["cct_2_3x2_32"]().eval()
    x = _inputs("cct_2_3x2_32", 2)
    cct_kernels.freeze(model)
    with torch.no_grad():
        model(*x)  # packs the linear weights for this batch
        for w in freezable_weights(model):
            w.mul_(0.5)  # bumps the version counter
        twin = FAMILIES["cct_2_3x2_32"]().eval()
        twin.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(*x), twin(*x), rtol=1e-5, atol=1e-5)
        model.load_state_dict(FAMILIES["cct_2_3x2_32"]().state_dict())
        twin.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(*x), twin(*x), rtol=1e-5, atol=1e-5)
        for w in freezable_weights(model):
            w.data.mul_(2.0)  # invisible to the version counter: freeze again, as documented
        cct_kernels.freeze(model)
        twin.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(*x), twin(*x), rtol=1e-5, atol=1e-5)


def test_training_a_frozen_model_equals_training_the_unfrozen_one():
    """Each optimizer step bumps the weights' versions: the next forward repacks, so the two runs stay equal."""
    torch.manual_seed(0)
    models = [FAMILIES["cct_2_3x2_32"]() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cct_kernels.freeze(models[1])
    x, labels = _inputs("cct_2_3x2_32", 4)[0], torch.tensor([0, 1, 2, 3])
    for model in models:
        model.train()
        torch.manual_seed(2)  # the same dropout and stochastic-depth draws for both
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(models[0].eval()(x), models[1].eval()(x), rtol=1e-5, atol=1e-5)


def test_freed_weights_leave_the_registry():
    before = frozen.stats()
    model = FAMILIES["cct_7x2"]()
    cct_kernels.freeze(model)
    with torch.no_grad():
        model.eval()(*_inputs("cct_7x2", 1))
    assert frozen.stats()["weights"] == before["weights"] + _expected_weights(model)
    del model
    gc.collect()
    assert frozen.stats() == before


def test_compiled_frozen_model_reads_the_packed_weights():
    if not frozen.has_packed_gemm():
        pytest.skip("this torch has no MKL packed GEMM: linear weights are not frozen")
    torch.manual_seed(0)
    model = cct_kernels.freeze(FAMILIES["cct_2_3x2_32"]().eval())
    x = _inputs("cct_2_3x2_32", 3)
    with torch.no_grad():
        expected = model(*x)
        cct_kernels.unfreeze(model)
        cct_kernels.freeze(model)
        before = frozen.stats()["packed"]
        out = torch.compile(model, fullgraph=True)(*x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert frozen.stats()["packed"] == before + len(_linear_weights(model))


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="2-D.*4-D"):
        frozen.freeze([torch.randn(3, 4, 5)])
    with torch.inference_mode():
        made_in_inference = torch.randn(8, 4)
    with pytest.raises(ValueError, match="inference_mode"):
        frozen.freeze([made_in_inference])
    with torch.inference_mode():
        model = FAMILIES["cct_2_3x2_32"]()
    with pytest.raises(ValueError, match="inference_mode"):
        cct_kernels.freeze(model)


def test_weights_freeze_can_not_use_are_not_kept():
    before = frozen.stats()
    assert frozen.freeze([torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4).t()]) == 0
    assert frozen.stats() == before


def test_threads_share_a_frozen_model():
    """Two threads running one frozen model at different batch sizes (each making and reading its packed copies
    under the registry's lock) get what the unfrozen model computes."""
    torch.manual_seed(0)
    model = FAMILIES["cct_2_3x2_32"]().eval()
    inputs = [_inputs("cct_2_3x2_32", batch)[0] for batch in (1, 2, 3, 5)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    cct_kernels.freeze(model)
    results, errors = {}, []

    def run(worker):
        try:
            with torch.no_grad():
                for _ in range(3):
                    for i, x in enumerate(inputs[worker::2]):
                        results[worker, i] = model(x)
        except Exception as e:  # reported by the main thread's assertion
            errors.append(e)

    run_in_threads(run, 2)
    assert not errors
    for (worker, i), out in results.items():
        torch.testing.assert_close(out, expected[worker + 2 * i], rtol=1e-5, atol=1e-5)
