"""What the speed backends other than a plain model run (cct_kernels.profiling builds them): torch.compile with
inductor's freezing ("compile-frozen"), CUDA-graph replay of the inference forward or of the whole training step
("graphs:*"), and ONNX Runtime ("onnxruntime")."""
from __future__ import annotations

import os
import tempfile
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FreezingCompiled(nn.Module):
    """torch.compile of `model` with inductor's freezing on (weights folded into the graph as constants, for
    inference). The config is patched around each call, so around the compilation at the first:
    torch.compile(options={"freezing": True}) does not turn it on in torch 2.13 (measured: cct_14_7x2_224 batch 1
    ran as without it, 55 against 42 ms). What is compiled is this wrapper's own method, not model's forward: dynamo
    keeps compiled code per code object and, inlining nn modules, would otherwise serve a plain "compile" row's code
    to this one (or this one's to it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._compiled = torch.compile(self._run)

    def _run(self, *inputs):
        return self.model(*inputs)

    def forward(self, *inputs):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self._compiled(*inputs)


class GraphedInference(nn.Module):
    """`model`'s inference forward captured in a CUDA graph at the first call and replayed after: each call copies its
    inputs into the captured buffers and replays (same shapes and dtypes every call). Eval mode only: training
    raises ValueError (make_step captures a graphs:* model's whole training step instead). Returns the captured
    output buffer (overwritten by the next call)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._graph = self._inputs = self._output = None

    def forward(self, *inputs):
        if self.training:
            raise ValueError("a GraphedInference model runs inference only (make_step captures its training step)")
        if self._graph is None:
            self._inputs = [x.clone() for x in inputs]

            def forward():
                with torch.inference_mode():
                    return self.model(*self._inputs)

            self._graph, self._output = _captured(forward, warmups=2)
        for buffer, x in zip(self._inputs, inputs):
            buffer.copy_(x)
        self._graph.replay()
        return self._output


class OnnxRuntimeInference(nn.Module):
    """`model` (eager backend) exported to ONNX at the first call (TorchScript exporter, opset 17, batch dimension
    dynamic) and run by ONNX Runtime's CPU provider on torch's thread count: what a CPU user deploys instead.
    Inference only (training raises ValueError)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._session = None

    def forward(self, *inputs):
        import onnxruntime

        if self.training:
            raise ValueError("onnxruntime runs inference only")
        names = [f"input{i}" for i in range(len(inputs))]
        if self._session is None:
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "model.onnx")
                torch.onnx.export(self.model.eval(), inputs, path, dynamo=False, opset_version=17,
                                  input_names=names, output_names=["logits"],
                                  dynamic_axes={name: {0: "batch"} for name in [*names, "logits"]})
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = torch.get_num_threads()
                self._session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(names, inputs)}
        return torch.from_numpy(self._session.run(None, feeds)[0])


def graphed_train_step(model: nn.Module, inputs: tuple, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    """make_step's training step (forward, loss, backward, AdamW) captured in one CUDA graph and replayed: PyTorch's
    whole-network capture. Three warm-up steps on a side stream first (Triton compiles, cuBLAS handles, the
    allocator's pools), then the capture, whose backward makes the gradients in the graph's pool (zero_grad with
    set_to_none before it, so each replay writes rather than accumulates them). AdamW with capturable=True keeps its
    step count on the GPU. Dropout and stochastic depth draw from torch's CUDA generator, which advances on every
    replay. Every replay runs on the same inputs and returns the same loss tensor, overwritten."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True)

    def body():
        optimizer.zero_grad(set_to_none=True)  # no kernel: the capture's backward then makes the gradients itself
        loss = F.cross_entropy(model(*inputs).float(), labels)
        loss.backward()
        optimizer.step()
        return loss

    graph, loss = _captured(body, warmups=3)

    def step():
        graph.replay()
        return loss

    return step


def _captured(run: Callable, warmups: int):
    """(graph, run()'s output from the capture): `run` called `warmups` times on a side stream (kernel compiles,
    library handles, the allocator's pools stay out of the capture), then captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = run()
    return graph, output
