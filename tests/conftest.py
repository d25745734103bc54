"""Test setup: Triton runs under its CPU interpreter when there is no GPU (must be set before triton imports)."""
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_runtest_logreport(report):
    """With CCT_TEST_RESULTS=<file>, append each test's outcome to it as a JSON line when the test ends (failures
    with their message's first line): a run cut off by a time limit (benchmarks/gpu_report.py) writes no junit file
    and no summary, and this keeps what it had. Under pytest-xdist the controller writes (workers skip)."""
    path = os.environ.get("CCT_TEST_RESULTS")
    if not path or os.environ.get("PYTEST_XDIST_WORKER") or not (report.when == "call" or report.failed or
                                                                  report.skipped):
        return
    lines = report.longreprtext.strip().splitlines() if report.failed else []
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]  # pytest's "E   <error>" lines
    message = (errors or lines[-1:] or [""])[0]
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "message": message[:300]}
    with open(path, "a") as stream:
        stream.write(json.dumps(line) + "\n")
