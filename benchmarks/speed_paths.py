"""Which kernel backends an op benchmark should time on this device."""
from cct_kernels import backends


def kernel_backends(op: str, input_sets, device) -> list[str]:
    """Kernel backends that can serve `op` for every input tuple in `input_sets` on `device`, as speed paths:
    on CPU, Triton only runs in its interpreter, which is for correctness, not speed."""
    input_sets = list(input_sets)
    return [
        name for name in backends.KERNEL_BACKENDS
        if not (name == "triton" and device.type != "cuda")
        and all(backends.unsupported_reason(name, op, device, *inputs) is None for inputs in input_sets)
    ]
