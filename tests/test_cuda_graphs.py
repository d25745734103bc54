"""CUDA-graph friendliness (issue 15): every model family in eval mode, on every backend that serves it on the GPU,
can be captured in a CUDA graph (speed_models.GraphedInference, the `graphs:*` rows of `cct-kernels bench`) and its
replays give the model's own outputs for new inputs; the whole training step (profiling.make_step of a graphs:*
model: forward, loss, backward, capturable AdamW) replays the plain step's losses. No host sync may happen inside
the forward or backward (the ops' checks use asynchronous asserts while a capture is under way). CUDA only: a
capture needs a GPU."""
import pytest
import torch

import cct_kernels
from cct_kernels import profiling, speed_models
from tests.cases import backends_serving_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

FAMILIES = ("cct_7_3x1_32", "cvt_7_4_32", "vit_lite_7_4_32", "text_cct_2", "text_vit_2")


def _cases():
    if not torch.cuda.is_available():
        return
    for family in FAMILIES:
        model = getattr(cct_kernels, family)().cuda().eval()
        inputs, _ = profiling.make_inputs(model, 2, torch.device("cuda"), torch.float32)
        for backend in backends_serving_model(model, inputs, train=False):
            yield pytest.param(family, backend, id=f"{family}-{backend}")


@pytest.mark.parametrize("family,backend", list(_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_model_replays_from_a_cuda_graph(family, backend, dtype):
    model = getattr(cct_kernels, family)(backend=backend).cuda().to(dtype).eval()
    graphed = speed_models.GraphedInference(model).eval()
    for seed in (1, 2):  # the first call captures, the second replays with new inputs
        inputs, _ = profiling.make_inputs(model, 4, torch.device("cuda"), dtype, seed=seed)
        with torch.inference_mode():
            expected = model(*inputs)
            out = graphed(*inputs).clone()
        torch.testing.assert_close(out, expected)


def _train_cases():
    if not torch.cuda.is_available():
        return
    for family in ("cct_7_3x1_32", "text_cct_2"):
        model = getattr(cct_kernels, family)().cuda()
        inputs, _ = profiling.make_inputs(model, 2, torch.device("cuda"), torch.float32)
        for backend in backends_serving_model(model, inputs, train=True):
            yield pytest.param(family, backend, id=f"{family}-{backend}")


@pytest.mark.parametrize("family,backend", list(_train_cases()))
def test_training_step_replays_from_a_cuda_graph(family, backend):
    """Without dropout or stochastic depth (their draws differ between a capture and plain calls) the graphed step's
    replays continue the plain step's loss sequence: it warms up with three steps, so its first replay is step 4."""
    device = torch.device("cuda")

    def build():
        torch.manual_seed(0)
        return getattr(cct_kernels, family)(backend=backend, dropout=0.0, attention_dropout=0.0,
                                            stochastic_depth=0.0).to(device)

    plain, graphed = build(), speed_models.GraphedInference(build())
    inputs, labels = profiling.make_inputs(plain, 4, device, torch.float32)
    plain_step = profiling.make_step(plain, "train", inputs, labels)
    graphed_step = profiling.make_step(graphed, "train", inputs, labels)
    losses = [plain_step().item() for _ in range(5)][3:]
    replayed = [graphed_step().item() for _ in range(2)]
    torch.testing.assert_close(replayed, losses, rtol=1e-4, atol=1e-5)
