"""Which kernel backends an op benchmark should time on this device, and the function each row times."""
import functools

import torch

from cct_kernels import backends, ops, reference


def kernel_backends(op: str, input_sets, device) -> list[str]:
    """Kernel backends that can serve `op` for every input tuple in `input_sets` on `device`, as speed paths:
    on CPU, Triton only runs in its interpreter, which is for correctness, not speed."""
    input_sets = list(input_sets)
    return [
        name for name in backends.KERNEL_BACKENDS
        if not (name == "triton" and device.type != "cuda")
        and all(backends.unsupported_reason(name, op, device, *inputs) is None for inputs in input_sets)
    ]


@functools.cache
def _compiled_reference(op: str):
    return torch.compile(getattr(reference, op))


def row_function(op: str, backend: str):
    """What an op benchmark's row `backend` times: the eager reference ("eager"), torch.compile of it ("compile"),
    or cct_kernels.ops.<op> on that kernel backend."""
    if backend == "eager":
        return getattr(reference, op)
    if backend == "compile":
        return _compiled_reference(op)
    return functools.partial(getattr(ops, op), backend=backend)
