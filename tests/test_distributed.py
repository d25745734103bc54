"""Training on 2 CPU processes (gloo), our ops inside DistributedDataParallel: one step's gradients equal a single
process's on the concatenated batch, a run interrupted in mid-epoch resumes exactly, and `cct-kernels train` runs
under torchrun with rank-0 output."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import cct_kernels
from cct_kernels.distributed import distributed_context
from cct_kernels.train import TrainConfig, train
from tests.test_train import DATASET

WORLD = 2
BATCH = 4  # per process


def tiny_model():
    torch.manual_seed(0)
    return cct_kernels.create_model("cct_2_3x2_32", img_size=28, n_input_channels=1, attention_dropout=0.0,
                                    stochastic_depth=0.0)


def global_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * BATCH, 1, 28, 28, generator=generator), torch.arange(WORLD * BATCH) % 10


def run_config(out, **kw):
    base = dict(dataset=DATASET, epochs=2, batch_size=16, train_subset=128, test_subset=64, out=str(out),
                progress=False, device="cpu", augment=True, warmup_epochs=0.5, lr=2e-3)
    return TrainConfig(**{**base, **kw})


def worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed_context("cpu") as ctx:  # one process group for both parts; train() uses it as it is
        assert ctx.backend == "gloo" and ctx.world_size == WORLD
        model = tiny_model()
        x, y = global_batch()
        shard = slice(rank * BATCH, (rank + 1) * BATCH)
        replica = ctx.wrap(model)  # kept alive through backward: its reducer all-reduces the gradients
        F.cross_entropy(replica(x[shard]), y[shard]).backward()
        torch.save({name: p.grad for name, p in model.named_parameters()}, out / f"grads{rank}.pt")

        runs = {"straight": train(run_config(out / "straight")),
                "interrupted": train(run_config(out / "resumed", time_limit=0.0)),
                "resumed": train(run_config(out / "resumed", resume=True))}
        (out / f"histories{rank}.json").write_text(json.dumps(runs))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), out), nprocs=WORLD, join=True)
    return out


def test_gradients_after_one_step_equal_one_process_on_the_concatenated_batch(two_processes):
    model = tiny_model()
    x, y = global_batch()
    F.cross_entropy(model(x), y).backward()
    for rank in range(WORLD):
        grads = torch.load(two_processes / f"grads{rank}.pt")
        for name, p in model.named_parameters():
            scale = p.grad.abs().max().item()
            assert (grads[name] - p.grad).abs().max().item() <= 1e-5 * scale + 1e-8, (rank, name)


def test_a_two_process_run_resumes_exactly_and_every_rank_agrees(two_processes):
    histories = [json.loads((two_processes / f"histories{rank}.json").read_text()) for rank in range(WORLD)]
    straight, interrupted, resumed = (histories[0][k] for k in ("straight", "interrupted", "resumed"))
    assert straight["world_size"] == WORLD and straight["steps"] == 8  # 128 images / 2 ranks / 16 per step * 2
    assert interrupted["steps"] == 1 and interrupted["stopped_early"]
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-6)
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    for run in ("straight", "interrupted", "resumed"):  # losses and accuracies are reduced over the ranks
        assert histories[1][run]["losses"] == histories[0][run]["losses"]
        assert histories[1][run]["test_accuracy"] == histories[0][run]["test_accuracy"]
    assert (two_processes / "straight" / "checkpoint.pt").is_file()


def test_cli_train_runs_under_torchrun(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               "-m", "cct_kernels", "train", "--dataset", DATASET, "--epochs", "1", "--train-subset", "64",
               "--test-subset", "32", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "run"),
               "--no-progress"]
    result = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    banners = [line for line in result.stdout.splitlines() if line.startswith("train: ")]
    assert len(banners) == 1 and f"world size {WORLD} (gloo)" in banners[0], result.stdout  # rank 0 alone prints
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["world_size"] == WORLD and history["steps"] == 2 and len(history["epochs"]) == 1
