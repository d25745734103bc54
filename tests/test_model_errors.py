"""Model constructors check their arguments at construction: each bad value raises TypeError / ValueError naming
the argument, the value and what is allowed. Also the edge values that are legal: num_classes=0 (no head) and
stochastic_depth=1.0 (blocks dropped with certainty contribute zero)."""
import re

import pytest
import torch

import cct_kernels
from cct_kernels import reference
from cct_kernels.nn import Attention, DropPath, Tokenizer, TransformerEncoderLayer

TINY = dict(img_size=16, embedding_dim=16, num_layers=1, num_heads=2, mlp_ratio=1.0, num_classes=3,
            kernel_size=3, stride=1, padding=1)
TINY_PATCH = dict(img_size=16, embedding_dim=16, num_layers=1, num_heads=2, mlp_ratio=1.0, num_classes=3,
                  kernel_size=4)

BAD_CCT_ARGUMENTS = [
    # (argument overrides, exception type, pattern the message must contain)
    (dict(img_size="32"), TypeError, "img_size must be an int or a (height, width) pair of ints, got '32'"),
    (dict(img_size=(16,)), ValueError, "img_size must be an int or a (height, width) pair"),
    (dict(img_size=16.0), TypeError, "img_size must be an int"),
    (dict(img_size=0), ValueError, "img_size height must be an int >= 1, got 0"),
    (dict(img_size=(16, -4)), ValueError, "img_size width must be an int >= 1, got -4"),
    (dict(embedding_dim=0), ValueError, "embedding_dim must be an int >= 1, got 0"),
    (dict(embedding_dim=-16), ValueError, "embedding_dim must be an int >= 1, got -16"),
    (dict(embedding_dim=18, num_heads=4), ValueError, "embedding_dim (18) must be divisible by num_heads (4)"),
    (dict(num_heads=0), ValueError, "num_heads must be an int >= 1, got 0"),
    (dict(num_heads=2.0), TypeError, "num_heads must be an int >= 1, got 2.0 (float)"),
    (dict(num_layers=-1), ValueError, "num_layers must be an int >= 0, got -1"),
    (dict(num_layers=True), TypeError, "num_layers must be an int >= 0, got True (bool)"),
    (dict(num_classes=-1), ValueError, "num_classes must be an int >= 0, got -1"),
    (dict(kernel_size=0), ValueError, "kernel_size must be an int >= 1, got 0"),
    (dict(kernel_size=(3, 3)), TypeError, "kernel_size must be an int >= 1, got (3, 3) (tuple)"),
    (dict(stride=0), ValueError, "stride must be an int >= 1, got 0"),
    (dict(padding=-1), ValueError, "padding must be an int >= 0, got -1"),
    (dict(n_conv_layers=0), ValueError, "n_conv_layers must be an int >= 1, got 0"),
    (dict(n_input_channels=0), ValueError, "n_input_channels must be an int >= 1, got 0"),
    (dict(pooling_kernel_size=0), ValueError, "pooling_kernel_size must be an int >= 1, got 0"),
    (dict(pooling_stride=0), ValueError, "pooling_stride must be an int >= 1, got 0"),
    (dict(pooling_padding=2), ValueError, "pooling_padding (2) must be at most half of pooling_kernel_size (3)"),
    (dict(mlp_ratio=0), ValueError, "mlp_ratio must be a number in (0, inf), got 0"),
    (dict(mlp_ratio=float("inf")), ValueError, "mlp_ratio must be a number in (0, inf), got inf"),
    (dict(mlp_ratio=0.01), ValueError, "must give a hidden size >= 1"),
    (dict(dropout=1.5), ValueError, "dropout must be a number in [0, 1], got 1.5"),
    (dict(attention_dropout=-0.1), ValueError, "attention_dropout must be a number in [0, 1), got -0.1"),
    (dict(attention_dropout=1.0), ValueError, "attention_dropout must be a number in [0, 1), got 1.0"),
    (dict(dropout=True), TypeError, "dropout must be a number in [0, 1], got True (bool)"),
    (dict(stochastic_depth=float("nan")), ValueError, "stochastic_depth must be a number in [0, 1], got nan"),
    (dict(stochastic_depth="0.1"), TypeError, "stochastic_depth must be a number in [0, 1], got '0.1' (str)"),
    (dict(positional_embedding=None), ValueError, "positional_embedding must be one of"),
    (dict(backend="fast"), ValueError, "unknown backend 'fast'"),
    (dict(img_size=4, kernel_size=7, padding=0), ValueError, "is too small for this tokenizer"),
]


@pytest.mark.parametrize("overrides,error,message", BAD_CCT_ARGUMENTS,
                         ids=[next(iter(o)) + "=" + repr(next(iter(o.values()))) for o, _, _ in BAD_CCT_ARGUMENTS])
def test_cct_constructor_names_the_bad_argument(overrides, error, message):
    with pytest.raises(error, match=re.escape(message)):
        cct_kernels.CCT(**{**TINY, **overrides})


@pytest.mark.parametrize("cls", [cct_kernels.CVT, cct_kernels.ViTLite])
def test_patch_model_constructors_check_first(cls):
    # kernel_size 0 used to reach `side % kernel_size` (ZeroDivisionError); a string size was split into digits.
    with pytest.raises(ValueError, match=re.escape("kernel_size must be an int >= 1, got 0")):
        cls(**{**TINY_PATCH, "kernel_size": 0})
    with pytest.raises(TypeError, match=re.escape("img_size must be an int or a (height, width) pair")):
        cls(**{**TINY_PATCH, "img_size": "16"})
    with pytest.raises(ValueError, match=re.escape("must be a multiple of the patch size kernel_size=4")):
        cls(**{**TINY_PATCH, "img_size": 18})


def test_factories_pass_their_arguments_through_the_checks():
    with pytest.raises(TypeError, match="img_size must be an int"):
        cct_kernels.cct_2_3x2_32(img_size="32")
    with pytest.raises(ValueError, match="num_classes must be an int >= 0, got -3"):
        cct_kernels.create_model("cvt_2_4_32", num_classes=-3)


def test_modules_check_their_own_arguments():
    with pytest.raises(ValueError, match=re.escape("dim (10) must be divisible by num_heads (4)")):
        Attention(10, 4)
    with pytest.raises(ValueError, match="num_heads must be an int >= 1, got 0"):
        Attention(8, 0)
    with pytest.raises(ValueError, match="dim_feedforward must be an int >= 1, got 0"):
        TransformerEncoderLayer(8, 2, dim_feedforward=0)
    with pytest.raises(ValueError, match="drop_path_rate must be a number in"):
        TransformerEncoderLayer(8, 2, drop_path_rate=2.0)
    with pytest.raises(ValueError, match="drop_prob must be a number in"):
        DropPath(-0.5)
    # The fused tokenize op computes ReLU: another activation used to be silently replaced by ReLU.
    with pytest.raises(ValueError, match="activation must be nn.ReLU or None"):
        Tokenizer(3, 1, 1, activation=torch.nn.GELU)


@pytest.mark.parametrize("cls,args", [(cct_kernels.CCT, TINY), (cct_kernels.CVT, TINY_PATCH),
                                      (cct_kernels.ViTLite, TINY_PATCH)])
def test_num_classes_zero_returns_the_pooled_features(cls, args):
    torch.manual_seed(0)
    headless = cls(**{**args, "num_classes": 0}, backend="eager").eval()
    assert isinstance(headless.classifier.fc, torch.nn.Identity) and headless.num_classes == 0
    assert not any(key.startswith("classifier.fc.") for key in headless.state_dict())
    x = torch.randn(2, 3, 16, 16)
    features = headless(x)
    assert features.shape == (2, 16)
    # The features are what a model with a head feeds its fc: same weights, fc applied by hand gives its logits.
    full = cls(**args, backend="eager").eval()
    full.load_state_dict(headless.state_dict(), strict=False)
    torch.testing.assert_close(full(x), full.classifier.fc(features))


def test_stochastic_depth_one_drops_blocks_with_certainty_and_stays_finite():
    torch.manual_seed(0)
    # Two blocks: drop-path rates linspace(0, 1, 2) = [0, 1]; the second block's branches always contribute 0.
    model = cct_kernels.CCT(**{**TINY, "num_layers": 2}, stochastic_depth=1.0, dropout=0.0,
                            attention_dropout=0.0, backend="eager").train()
    x = torch.randn(3, 3, 16, 16)
    out = model(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    last = model.classifier.blocks[1]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert last.linear1.weight.grad.abs().max() == 0 and last.self_attn.qkv.weight.grad.abs().max() == 0
    # Same as the model without the second block's branches: only its norm1 acts on the stream.
    tokens = model.tokenizer(x) + model.classifier.positional_emb
    expected = last.norm1(model.classifier.blocks[0](tokens))
    expected = model.classifier.norm(expected)
    expected = model.classifier.fc(reference.pool_by_scores(model.classifier.attention_pool(expected), expected))
    torch.testing.assert_close(out, expected)


def test_drop_path_one_is_zero_and_keeps_the_rng_stream_of_the_official_formula():
    x = torch.randn(4, 3, 5)
    torch.manual_seed(3)
    dropped = DropPath(1.0).train()(x)
    after = torch.rand(1)
    assert torch.equal(dropped, torch.zeros_like(x))
    torch.manual_seed(3)
    torch.rand(4, 1, 1)  # the official formula draws one number per sample even at rate 1
    assert torch.equal(torch.rand(1), after)
