"""The convolutional tokenizer, with the official module tree (tokenizer.conv_layers.{i}.0 is the conv)."""
from __future__ import annotations

from torch import nn

from cct_kernels import ops
from cct_kernels.nn._backend import UsesBackend
from cct_kernels.nn._checks import check_int
from cct_kernels.nn._fusable import fusable_stage
from cct_kernels.ops.tokenize import output_size


class ConvStage(UsesBackend, nn.Sequential):
    """Conv2d -> ReLU or Identity -> MaxPool2d or Identity, computed by the fused tokenize op."""

    def __init__(self, conv: nn.Conv2d, relu: bool, pool: nn.MaxPool2d | None):
        super().__init__(conv, nn.ReLU() if relu else nn.Identity(), pool if pool is not None else nn.Identity())

    def forward(self, x, to_tokens: bool = False):
        conv, act, pool = self
        if not fusable_stage(conv, act, pool):
            x = pool(act(conv(x)))  # called as modules (nn/_fusable.py), as the official nn.Sequential does
            return x.flatten(2).transpose(1, 2) if to_tokens else x
        pool_args = (pool.kernel_size, pool.stride, pool.padding) if isinstance(pool, nn.MaxPool2d) else None
        return ops.tokenize(
            x, conv.weight, conv.bias, stride=conv.stride[0], padding=conv.padding[0],
            relu=isinstance(act, nn.ReLU), pool=pool_args, to_tokens=to_tokens, backend=self.backend,
        )


class Tokenizer(nn.Module):
    """n_conv_layers stages of conv -> act -> pool, then tokens (B, H*W, C) in row-major order.

    Channels: n_input_channels -> in_planes (each inner stage) -> n_output_channels. Official defaults.
    Square kernels, strides and paddings (ints); activation is nn.ReLU or None (the fused op computes ReLU);
    max pool padding at most half its kernel. A bad argument raises TypeError / ValueError naming it.
    """

    def __init__(
        self, kernel_size, stride, padding, pooling_kernel_size=3, pooling_stride=2, pooling_padding=1,
        n_conv_layers=1, n_input_channels=3, n_output_channels=64, in_planes=64, activation=nn.ReLU,
        max_pool=True, conv_bias=False,
    ):
        super().__init__()
        for name, value, minimum in (
            ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
            ("n_conv_layers", n_conv_layers, 1), ("n_input_channels", n_input_channels, 1),
            ("n_output_channels", n_output_channels, 1), ("in_planes", in_planes, 1),
        ):
            check_int(name, value, minimum)
        if max_pool:
            check_int("pooling_kernel_size", pooling_kernel_size, 1)
            check_int("pooling_stride", pooling_stride, 1)
            check_int("pooling_padding", pooling_padding, 0)
            if 2 * pooling_padding > pooling_kernel_size:
                raise ValueError(f"pooling_padding ({pooling_padding}) must be at most half of pooling_kernel_size "
                                 f"({pooling_kernel_size})")
        if activation not in (None, nn.ReLU):
            raise ValueError(f"activation must be nn.ReLU or None (the fused tokenize op computes ReLU), got "
                             f"{activation!r}")
        channels = [n_input_channels] + [in_planes] * (n_conv_layers - 1) + [n_output_channels]
        self.conv_layers = nn.Sequential(*[
            ConvStage(
                nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=conv_bias),
                relu=activation is not None,
                pool=nn.MaxPool2d(pooling_kernel_size, pooling_stride, pooling_padding) if max_pool else None,
            )
            for c_in, c_out in zip(channels[:-1], channels[1:])
        ])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (rows, cols) for an input image of height x width, computed without running it."""
        for conv, _, pool in self.conv_layers:
            height = output_size(height, conv.kernel_size[0], conv.stride[0], conv.padding[0])
            width = output_size(width, conv.kernel_size[1], conv.stride[1], conv.padding[1])
            if isinstance(pool, nn.MaxPool2d):
                height = output_size(height, pool.kernel_size, pool.stride, pool.padding)
                width = output_size(width, pool.kernel_size, pool.stride, pool.padding)
        return height, width

    def forward(self, x):
        last = len(self.conv_layers) - 1
        for i, stage in enumerate(self.conv_layers):
            x = stage(x, to_tokens=i == last)
        return x
