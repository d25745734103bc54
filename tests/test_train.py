"""Training on real data: it learns, checkpoints resume exactly, and kernel backends follow eager's loss curve."""
import pytest

import torch
import torch._inductor.config

import cct_kernels
from cct_kernels.train import FASHION_MNIST_DIR, TrainConfig, adamw, augment, load_dataset, train
from tests.cases import KERNEL_BACKENDS_HERE, backends_serving_model

DATASET = "fashion-mnist" if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists() else "digits"


def short(tmp_path, **kw):
    base = dict(dataset=DATASET, epochs=2, batch_size=64, train_subset=640, test_subset=500, out=str(tmp_path),
                progress=False, warmup_epochs=0.5, lr=2e-3, augment=True, device="cpu")
    return TrainConfig(**{**base, **kw})


def kernel_backends_serving_training(model_name="cct_2_3x2_32"):
    """Kernel backends here (but triton: too slow interpreted) that serve every op of train()'s model on CPU float32
    in train mode."""
    model = cct_kernels.create_model(model_name, img_size=28, n_input_channels=1)
    serving = backends_serving_model(model, torch.randn(2, 1, 28, 28), train=True)
    return [b for b in serving if b in KERNEL_BACKENDS_HERE and b != "triton"]


def test_dataset_shapes_and_normalisation():
    train_x, train_y, test_x, test_y = load_dataset(DATASET)
    assert train_x.shape[1:] == (1, 28, 28) and test_x.shape[1:] == (1, 28, 28)
    assert len(train_x) == len(train_y) and len(test_x) == len(test_y)
    if DATASET == "fashion-mnist":
        assert (len(train_y), len(test_y)) == (60000, 10000)
    assert abs(train_x.mean().item()) < 1e-3 and abs(train_x.std().item() - 1) < 1e-3
    assert set(train_y.unique().tolist()) == set(range(10))


def test_augment_flips_and_shifts_each_image_on_its_own():
    x = torch.arange(64 * 7 * 6, dtype=torch.float32).reshape(64, 1, 7, 6) + 1  # no zeros: padding is visible
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(len(x)):  # each output image is one crop of its (possibly flipped) padded image
        matches = [(f, dy, dx) for f in (False, True) for dy in range(5) for dx in range(5)
                   if torch.equal(out[i], (padded[i].flip(-1) if f else padded[i])[:, dy: dy + 7, dx: dx + 6])]
        assert matches, i
        seen.add(matches[0])
    assert len(seen) > 10  # per image, not one draw for the batch


def test_it_learns_and_resumes_exactly_after_a_time_limit_in_mid_epoch(tmp_path, capsys):
    straight = train(short(tmp_path / "straight"))
    assert straight["test_accuracy"] > 0.25, straight["epochs"]  # chance is 0.10; 20 steps reach 0.30
    assert straight["steps"] == 20 and not straight["stopped_early"]
    banner = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train: ")]
    assert len(banner) == 1 and "cct_2_3x2_32 on" in banner[0] and "world size 1" in banner[0]
    interrupted = train(short(tmp_path / "resumed", time_limit=0.0))  # the limit is checked after every step
    assert interrupted["steps"] == 1 and interrupted["stopped_early"] and interrupted["epochs"] == []
    resumed = train(short(tmp_path / "resumed", resume=True))
    assert resumed["steps"] == 20 and len(resumed["losses"]) == 20
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-6)
    assert resumed["test_accuracy"] == straight["test_accuracy"]


@pytest.mark.parametrize("backend", kernel_backends_serving_training())
def test_kernel_backend_follows_the_eager_loss_curve(tmp_path, backend):
    eager = train(short(tmp_path / "eager", epochs=1, train_subset=320, test_subset=100, backend="eager"))
    kernel = train(short(tmp_path / backend, epochs=1, train_subset=320, test_subset=100, backend=backend))
    assert kernel["losses"][:5] == pytest.approx(eager["losses"][:5], rel=2e-3)


def test_compiled_training_follows_the_uncompiled_loss_curve(tmp_path, capsys):
    """--compile: the training forward and backward through torch.compile over the cpu backend's ops give the
    uncompiled run's losses (same weights, batches and, with inductor drawing from ATen's generator, the same dropout
    and stochastic-depth draws: otherwise the losses differ by ~2e-3), and the banner says so."""
    backend = "cpu" if "cpu" in KERNEL_BACKENDS_HERE else "eager"
    # inductor's own config.patch: pytest's monkeypatch.setattr on a config module deletes the entry on undo,
    # which hides it from every later compile of the process ("fallback_random does not exist")
    with torch._inductor.config.patch(fallback_random=True):
        plain = train(short(tmp_path / "plain", epochs=1, train_subset=256, test_subset=100, backend=backend))
        compiled = train(short(tmp_path / "compiled", epochs=1, train_subset=256, test_subset=100, backend=backend,
                               compile="default"))
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert compiled["test_accuracy"] == pytest.approx(plain["test_accuracy"], abs=0.011)
    assert "torch.compile mode default" in capsys.readouterr().out


def test_adamw_is_fused_where_torch_has_it_and_updates_as_the_default_one():
    torch.manual_seed(0)
    weights = [torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)]
    twins = [w.detach().clone().requires_grad_() for w in weights]
    fused, default = adamw(weights, lr=1e-2, weight_decay=0.05), torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.05)
    assert fused.defaults["fused"] and not default.defaults["fused"]
    for step in range(5):
        grads = [torch.randn_like(w) for w in weights]
        for params, optimizer in ((weights, fused), (twins, default)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for w, t in zip(weights, twins):
        torch.testing.assert_close(w, t, rtol=1e-5, atol=1e-6)
    assert not adamw([torch.randn(4, dtype=torch.float64, requires_grad=True)]).defaults["fused"]
