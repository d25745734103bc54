"""Replaced or hooked submodules (nn/_fusable.py): a fused module (encoder block, attention, tokenizer stage) calls
them as the official module-by-module forward does, so a LoRA-style or quantized linear computes what it would in
the official model, and hooks (forward, backward, global) fire with the official modules' outputs."""
import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

import cct_kernels
from tests.cases import DEVICE

BLOCK_LINEARS = ("self_attn.qkv", "self_attn.proj", "linear1", "linear2")


class LowRankLinear(nn.Module):
    """A LoRA-style wrapper: base(x) + x @ A^T @ B^T, with the base Linear's `weight` and `bias` exposed (as PEFT's
    wrappers expose them), so a fused forward that read `weight` would silently skip the low-rank term."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank, device=base.weight.device) * 0.1)

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + x @ self.lora_a.t() @ self.lora_b.t()

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def _model(train=False):
    torch.manual_seed(0)
    model = cct_kernels.cct_2_3x2_32().to(DEVICE)
    return model.train() if train else model.eval()


def _replace(model, name, make):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, make(getattr(parent, child)))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_low_rank_linears_compute_what_their_merged_weights_do(train):
    """Every block linear wrapped: the output equals the stock model with each wrapper's weights merged (the fused
    path), and the low-rank parameters get gradients."""
    model = _model(train)
    for block in range(2):
        for name in BLOCK_LINEARS:
            _replace(model, f"classifier.blocks.{block}.{name}", LowRankLinear)
    merged = _model(train)
    merged.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k}, strict=False)
    for block in range(2):
        for name in BLOCK_LINEARS:
            _replace(merged, f"classifier.blocks.{block}.{name}",
                     lambda _, b=block, n=name: model.get_submodule(f"classifier.blocks.{b}.{n}").merged())
    images = torch.randn(2, 3, 32, 32, device=DEVICE)

    def run(m):  # the same dropout and stochastic-depth draws for each model
        torch.manual_seed(1)
        return m(images)

    out = run(model)
    torch.testing.assert_close(out, run(merged), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, run(_model(train)), rtol=1e-3, atol=1e-3)  # the low-rank terms count
    out.square().sum().backward()
    lora_a = model.get_submodule("classifier.blocks.0.linear1").lora_a
    assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0


def test_forward_hooks_on_submodules_fire_with_the_official_outputs():
    model = _model()
    seen = {}
    names = ("tokenizer.conv_layers.0.0", "classifier.blocks.0.self_attn", "classifier.blocks.0.self_attn.qkv",
             "classifier.blocks.1.linear1", "classifier.blocks.1.norm1")
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: seen.update({n: o.shape}))
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        out = model(images)
    assert seen == {"tokenizer.conv_layers.0.0": (2, 64, 32, 32), "classifier.blocks.0.self_attn": (2, 64, 128),
                    "classifier.blocks.0.self_attn.qkv": (2, 64, 384), "classifier.blocks.1.linear1": (2, 64, 128),
                    "classifier.blocks.1.norm1": (2, 64, 128)}
    with torch.no_grad():
        torch.testing.assert_close(out, _model()(images), rtol=1e-4, atol=1e-4)


def test_forward_set_on_an_instance_is_called():
    """A forward replaced on the module instance (as accelerate's add_hook_to_module does) is called."""
    model = _model()
    linear1 = model.get_submodule("classifier.blocks.0.linear1")
    calls = []
    plain_forward = linear1.forward
    linear1.forward = lambda x: calls.append(x.shape) or plain_forward(x)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        out = model(images)
        torch.testing.assert_close(out, _model()(images), rtol=1e-4, atol=1e-4)
    assert calls == [(2, 64, 128)]


def test_replaced_dropout_runs_on_the_eager_backend_in_training():
    """A dropout module replaced by another kind of module (whose rate no fused op could read) is called, also on
    the eager backend with stochastic depth active, where the block checks the official order of random draws."""
    torch.manual_seed(0)
    model = cct_kernels.cct_2_3x2_32(backend="eager", dropout=0.1, stochastic_depth=0.1).to(DEVICE).train()
    calls = []
    attention = model.classifier.blocks[1].self_attn  # block 1: stochastic depth 0.1 (block 0 has 0)
    attention.proj_drop = nn.Sequential(nn.Dropout(0.1))
    attention.proj_drop.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32, device=DEVICE))).all()
    assert calls == [(2, 64, 128)]


def test_backward_and_global_hooks_fire():
    model = _model(train=True)
    grads, calls = [], []
    model.get_submodule("classifier.blocks.0.linear2").register_full_backward_hook(
        lambda m, grad_in, grad_out: grads.append(grad_out[0].shape))
    handle = torch_module.register_module_forward_hook(
        lambda m, i, o: calls.append(type(m).__name__) if isinstance(m, nn.Linear) else None)
    try:
        model(torch.randn(2, 3, 32, 32, device=DEVICE)).sum().backward()
    finally:
        handle.remove()
    assert grads == [(2, 64, 128)]
    # qkv, proj, linear1, linear2 of two blocks, then SeqPool's scorer attention_pool and fc
    assert calls == ["Linear"] * 10


def test_replaced_tokenizer_conv_is_called():
    class ShiftedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = _model()
    stage = model.get_submodule("tokenizer.conv_layers.0")
    conv = stage[0]
    shifted = ShiftedConv(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          bias=False, device=DEVICE)
    shifted.load_state_dict(conv.state_dict())
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        expected = stage[2](stage[1](conv(images) + 1.0))
        stage[0] = shifted
        torch.testing.assert_close(stage(images), expected)


def test_text_tokenizer_with_a_hooked_conv_runs_it_as_a_module():
    torch.manual_seed(0)
    model = cct_kernels.text_cct_2(vocab_size=1000, seq_len=64, num_classes=5).to(DEVICE).eval()
    ids = torch.randint(1, 1000, (2, 64), device=DEVICE)
    with torch.no_grad():
        expected = model(ids)
        seen = []
        model.get_submodule("tokenizer.conv_layers.0").register_forward_hook(lambda m, i, o: seen.append(o.shape))
        out = model(ids)
    assert len(seen) == 1 and seen[0][:2] == (2, 128)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


QUANTIZE_DYNAMIC = getattr(torch.ao.quantization, "quantize_dynamic", None)  # deprecated in torch 2.13


@pytest.mark.skipif(DEVICE.type != "cpu" or QUANTIZE_DYNAMIC is None
                    or not {"fbgemm", "qnnpack", "x86"} & set(torch.backends.quantized.supported_engines),
                    reason="dynamic int8 quantization needs torch.ao's quantize_dynamic and a CPU quantized engine")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_dynamically_quantized_linears_are_used():
    """torch.ao's dynamic quantization swaps every nn.Linear for an int8 one: the model runs them (its output
    moves off the float model's, by int8 rounding only)."""
    model = _model()
    quantized = QUANTIZE_DYNAMIC(_model(), {nn.Linear}, dtype=torch.qint8)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        expected, out = model(images), quantized(images)
    assert not torch.equal(out, expected)
    torch.testing.assert_close(out, expected, rtol=0.1, atol=0.1 * expected.abs().max().item())



@pytest.mark.parametrize("masked", [False, True])
def test_wrapped_attention_pool_scores_the_tokens(masked):
    """attention_pool (the official nn.Linear(D, 1)) wrapped LoRA-style: the classifier pools by the wrapper's
    scores, over real tokens only with a mask, as the stock model does with the merged weights; a hook on it sees
    the (B, N, 1) scores."""
    torch.manual_seed(0)
    model = cct_kernels.text_cct_2(vocab_size=1000, seq_len=64, num_classes=5).to(DEVICE).eval()
    merged = cct_kernels.text_cct_2(vocab_size=1000, seq_len=64, num_classes=5).to(DEVICE).eval()
    merged.load_state_dict(model.state_dict())
    model.classifier.attention_pool = LowRankLinear(model.classifier.attention_pool)
    merged.classifier.attention_pool = model.classifier.attention_pool.merged()
    seen = []
    model.classifier.attention_pool.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    ids = torch.randint(1, 1000, (2, 64), device=DEVICE)
    mask = torch.arange(64, device=DEVICE)[None, :] < torch.tensor([[64], [40]], device=DEVICE) if masked else None
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), merged(ids, mask), rtol=1e-4, atol=1e-4)
    assert len(seen) == 1 and seen[0][0] == 2 and seen[0][2] == 1
