"""Training on real data, offline: Fashion-MNIST (Debian package dataset-fashion-mnist) with the official recipe
where it fits (AdamW, linear warmup then cosine, label smoothing 0.1), checkpoints and resume. Augmentation (random
flips and shifts) is off by default: in a CPU budget of ~10 epochs the model underfits, and without augmentation it
learns faster (benchmarks/NOTES.md, "Fashion-MNIST").

Run it as `cct-kernels train` (or `python -m cct_kernels train`); `train(TrainConfig(...))` from Python; on several
processes or GPUs as `torchrun --nproc_per_node=N -m cct_kernels train ...` (DistributedDataParallel: gloo on CPU,
nccl on CUDA; cct_kernels/distributed.py).
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
from torch.utils.data import DistributedSampler

import cct_kernels
from cct_kernels.distributed import DistributedContext, distributed_context

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def adamw(parameters, **kwargs) -> torch.optim.AdamW:
    """torch.optim.AdamW(parameters, **kwargs), fused (one kernel over all tensors) where torch has it for their
    devices and dtypes (CPU and CUDA, float32/float16/bfloat16): the same update to float rounding, and on CPU 3-7x
    faster than the default for-each implementation (a step over text_cct_6's 30M-parameter embedding: 159 -> 23 ms
    on the 2-core VM; benchmarks/NOTES.md, ninth round)."""
    parameters = list(parameters)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in parameters)
    return torch.optim.AdamW(parameters, fused=fused or None, **kwargs)


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
    compile: str | None = None  # a torch.compile mode ("default", "reduce-overhead", ...) for the training forward
    seed: int = 0
    out: str = "cct_train"
    resume: bool = False
    time_limit: float | None = None  # minutes, checked after every step; --resume continues exactly
    threads: int | None = None
    device: str | None = None  # default: cuda (this process's GPU under torchrun) when available, else cpu
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
def evaluate(model, x, y, ctx: DistributedContext | None = None, batch_size=512) -> float:
    """Accuracy of `model` on (x, y); under torch.distributed each rank scores its share and the counts are summed."""
    ctx = ctx or DistributedContext()
    model.eval()
    x, y = x[ctx.rank:: ctx.world_size], y[ctx.rank:: ctx.world_size]
    correct = sum((model(x[i: i + batch_size].to(ctx.device)).argmax(1).cpu() == y[i: i + batch_size]).sum().item()
                  for i in range(0, len(y), batch_size))
    return ctx.sum(correct) / ctx.sum(len(y))


def train(config: TrainConfig) -> dict:
    """Train, checkpoint every epoch into config.out, and return the history with the final test accuracy.

    Under torchrun (WORLD_SIZE > 1 in the environment) every process trains a DistributedDataParallel replica on
    its shard of each epoch (DistributedSampler): config.batch_size is per process, so one step sees
    batch_size * world_size images. Rank 0 alone prints, writes the checkpoint and history.json; every rank returns
    the same history. history["losses"] holds the step losses averaged over the processes.
    """
    with distributed_context(config.device) as ctx:
        return _train(config, ctx)


def _train(config: TrainConfig, ctx: DistributedContext) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    train_x, train_y, test_x, test_y = load_dataset(config.dataset)
    train_x, train_y = train_x[: config.train_subset], train_y[: config.train_subset]
    test_x, test_y = test_x[: config.test_subset], test_y[: config.test_subset]
    model = cct_kernels.create_model(
        config.model, img_size=train_x.shape[-1], n_input_channels=1, num_classes=int(train_y.max()) + 1,
        backend=config.backend,
    ).to(ctx.device)
    optimizer = adamw(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sampler = DistributedSampler(range(len(train_y)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=config.seed)
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    total, warmup = config.epochs * steps_per_epoch, int(config.warmup_epochs * steps_per_epoch)
    torch.manual_seed(config.seed + ctx.rank)  # dropout and stochastic depth differ per rank
    generator = torch.Generator().manual_seed(config.seed + ctx.rank)  # augmentation, per rank
    out = Path(config.out)
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    history, step = {"config": dataclasses.asdict(config), "world_size": ctx.world_size, "epochs": [],
                     "losses": []}, 0
    checkpoint = out / "checkpoint.pt"
    if config.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("world_size", 1) != ctx.world_size:
            raise ValueError(f"{checkpoint} was written by {state.get('world_size', 1)} processes; resume it with "
                             f"as many (got world size {ctx.world_size}): the batch order depends on it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generators"][ctx.rank])
        torch.set_rng_state(state["torch_rngs"][ctx.rank])
        if ctx.device.type == "cuda" and state.get("cuda_rngs"):  # dropout on the GPU draws from its own generator
            torch.cuda.set_rng_state(state["cuda_rngs"][ctx.rank], ctx.device)
        history, step = state["history"], state["step"]
    trained = ctx.wrap(model)
    if config.compile is not None:  # the training forward and backward; evaluation runs the module as it is
        trained = torch.compile(trained, mode=None if config.compile == "default" else config.compile)

    if ctx.rank == 0:
        print(banner(config, ctx, len(train_y), len(test_y)), flush=True)
    bar = _progress(total, step, config.progress and ctx.rank == 0)
    run_started = started = time.perf_counter()
    order_epoch, order = None, None
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # this rank's share of the epoch's permutation (the same on every run)
            sampler.set_epoch(epoch)
            order_epoch, order = epoch, torch.tensor(list(sampler))
            started = time.perf_counter() if i == 0 else started
        model.train()
        idx = order[i * config.batch_size: (i + 1) * config.batch_size]
        images = augment(train_x[idx], generator) if config.augment else train_x[idx]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, warmup, config.lr)
        loss = F.cross_entropy(trained(images.to(ctx.device)), train_y[idx].to(ctx.device),
                               label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        history["losses"].append(ctx.mean(loss.detach()))
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{history['losses'][-1]:.3f}")
        if step % steps_per_epoch == 0 or step == total:
            accuracy = evaluate(model, test_x, test_y, ctx)
            history["epochs"].append({"epoch": epoch, "test_accuracy": accuracy,
                                      "seconds": time.perf_counter() - started})
            if ctx.rank == 0:
                bar.write(f"epoch {epoch}: test accuracy {accuracy:.4f} ({history['epochs'][-1]['seconds']:.0f} s)")
        out_of_time = config.time_limit is not None and time.perf_counter() - run_started >= 60 * config.time_limit
        out_of_time = ctx.any(out_of_time)  # every rank stops at the same step
        if step % steps_per_epoch == 0 or step == total or out_of_time:
            _save(checkpoint, model, optimizer, generator, history, step, ctx)
        if out_of_time:
            break
    bar.close()
    history["steps"], history["stopped_early"] = step, step < total
    history["test_accuracy"] = history["epochs"][-1]["test_accuracy"] if history["epochs"] else None
    if ctx.rank == 0:
        (out / "history.json").write_text(json.dumps(history, indent=1))
    return history


def _save(path: Path, model, optimizer, generator, history, step: int, ctx: DistributedContext) -> None:
    """Checkpoint after `step` steps: weights, optimizer, and every rank's random state (for an exact resume)."""
    generators, torch_rngs = ctx.gather(generator.get_state()), ctx.gather(torch.get_rng_state())
    cuda_rngs = ctx.gather(torch.cuda.get_rng_state(ctx.device)) if ctx.device.type == "cuda" else None
    if ctx.rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "world_size": ctx.world_size, "generators": generators, "torch_rngs": torch_rngs,
                    "cuda_rngs": cuda_rngs, "history": history}, path)
    ctx.barrier()


def banner(config: TrainConfig, ctx: DistributedContext, n_train: int, n_test: int) -> str:
    """One line saying what is about to run: model, data, backend (and compile mode), threads or device, world
    size."""
    where = (f"{torch.cuda.get_device_name(ctx.device)} ({ctx.device})" if ctx.device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads per process")
    compiled = f", torch.compile mode {config.compile}" if config.compile else ""
    return (f"train: {config.model} on {config.dataset} ({n_train} train / {n_test} test images), backend "
            f"{config.backend or cct_kernels.backends.requested_backend()}{compiled}, {where}, world size "
            f"{ctx.world_size} ({ctx.backend or 'single process'}), {config.batch_size} images per step per process, "
            f"{config.epochs} epochs")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled or os.environ.get("CI") == "true",
                unit="step", dynamic_ncols=True)
