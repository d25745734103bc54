"""CUDA-graph friendliness (issue 15): every model family in eval mode, on every backend that serves it on the GPU,
can be captured in a CUDA graph (profiling.GraphedInference, the `graphs:*` rows of `cct-kernels bench`) and its
replays give the model's own outputs for new inputs. No host sync may happen inside the forward (the ops' checks
use asynchronous asserts while a capture is under way). CUDA only: a capture needs a GPU."""
import pytest
import torch

import cct_kernels
from cct_kernels import profiling
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
    graphed = profiling.GraphedInference(model).eval()
    for seed in (1, 2):  # the first call captures, the second replays with new inputs
        inputs, _ = profiling.make_inputs(model, 4, torch.device("cuda"), dtype, seed=seed)
        with torch.inference_mode():
            expected = model(*inputs)
            out = graphed(*inputs).clone()
        torch.testing.assert_close(out, expected)
