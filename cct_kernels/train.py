"""Training on real data, offline: Fashion-MNIST (Debian package dataset-fashion-mnist) with the official recipe
where it fits (AdamW, linear warmup then cosine, label smoothing 0.1), checkpoints and resume. Augmentation (random
flips and shifts) is off by default: in a CPU budget of ~10 epochs the model underfits, and without augmentation it
learns faster (benchmarks/NOTES.md, "Fashion-MNIST").

Run it as `cct-kernels train` (or `python -m cct_kernels train`); `train(TrainConfig(...))` from Python.
The model is any factory adapted to the data: e.g. cct_2_3x2_32 with img_size=28, n_input_channels=1.
Falls back to scikit-learn's 8x8 digits (upsampled to 28x28) when the Fashion-MNIST files are not there.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cct_kernels

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclasses.dataclass
class TrainConfig:
    model: str = "cct_2_3x2_32"
    dataset: str = "fashion-mnist"  # or "digits"
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 6e-2
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    augment: bool = False  # random horizontal flip and shift of up to 2 pixels, per image
    train_subset: int | None = None  # first N training images (for short runs)
    test_subset: int | None = None
    backend: str | None = None
    seed: int = 0
    out: str = "cct_train"
    resume: bool = False
    time_limit: float | None = None  # minutes; stop after the epoch that passes it (--resume continues)
    threads: int | None = None
    progress: bool = True


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_dataset(name: str = "fashion-mnist", root: Path = FASHION_MNIST_DIR):
    """(train_x, train_y, test_x, test_y): images (N, 1, 28, 28) float32 normalised, labels int64."""
    if name == "fashion-mnist":
        if not (root / "train-images-idx3-ubyte.gz").exists():
            raise FileNotFoundError(
                f"Fashion-MNIST not found under {root}: `apt-get install dataset-fashion-mnist`, or use "
                f"--dataset digits (scikit-learn)"
            )
        parts = [_read_idx(root / f"{split}-{kind}-idx{n}-ubyte.gz")
                 for split in ("train", "t10k") for kind, n in (("images", 3), ("labels", 1))]
        train_x, train_y, test_x, test_y = (torch.from_numpy(p.copy()) for p in parts)
        train_x, test_x = (x.float().div_(255).unsqueeze(1) for x in (train_x, test_x))
    elif name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = F.interpolate(torch.from_numpy(digits.images).float().unsqueeze(1) / 16, size=(28, 28), mode="bilinear")
        y = torch.from_numpy(digits.target).long()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]
    else:
        raise ValueError(f"unknown dataset {name!r}; expected 'fashion-mnist' or 'digits'")
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, train_y.long(), (test_x - mean) / std, test_y.long()


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to `shift` pixels (zero padding), per image. x: (B, C, H, W)."""
    B, C, H, W = x.shape
    flip = torch.rand(B, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (shift,) * 4)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B), generator=generator)
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W))[:, None, None, :]  # (B, 1, 1, W)
    return padded[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup to `base`, then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(model, x, y, batch_size=512) -> float:
    model.eval()
    correct = sum((model(x[i: i + batch_size]).argmax(1) == y[i: i + batch_size]).sum().item()
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def train(config: TrainConfig) -> dict:
    """Train, checkpoint every epoch into config.out, and return the history with the final test accuracy."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    train_x, train_y, test_x, test_y = load_dataset(config.dataset)
    train_x, train_y = train_x[: config.train_subset], train_y[: config.train_subset]
    test_x, test_y = test_x[: config.test_subset], test_y[: config.test_subset]
    model = cct_kernels.create_model(
        config.model, img_size=train_x.shape[-1], n_input_channels=1, num_classes=int(train_y.max()) + 1,
        backend=config.backend,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_y) / config.batch_size)
    total, warmup = config.epochs * steps_per_epoch, int(config.warmup_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    history, start_epoch = {"config": dataclasses.asdict(config), "epochs": [], "losses": []}, 0
    checkpoint = out / "checkpoint.pt"
    if config.resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch = state["history"], state["epoch"] + 1

    bar = _progress(total, start_epoch * steps_per_epoch, config.progress)
    run_started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(train_y), generator=generator)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, config.lr)
            idx = order[i * config.batch_size: (i + 1) * config.batch_size]
            images = augment(train_x[idx], generator) if config.augment else train_x[idx]
            loss = F.cross_entropy(model(images), train_y[idx], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history["losses"].append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        accuracy = evaluate(model, test_x, test_y)
        history["epochs"].append({"epoch": epoch, "test_accuracy": accuracy,
                                  "seconds": time.perf_counter() - started})
        bar.write(f"epoch {epoch}: test accuracy {accuracy:.4f} ({history['epochs'][-1]['seconds']:.0f} s)")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history},
                   checkpoint)
        if config.time_limit is not None and time.perf_counter() - run_started >= 60 * config.time_limit:
            break
    bar.close()
    history["test_accuracy"] = history["epochs"][-1]["test_accuracy"] if history["epochs"] else None
    (out / "history.json").write_text(json.dumps(history, indent=1))
    return history


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled or os.environ.get("CI") == "true",
                unit="step", dynamic_ncols=True)
