"""The model zoo is the official function: parameter counts, state_dict, outputs, gradients, errors."""
import pytest
import torch

import cct_kernels
from cct_kernels.models.factories import SIZES

# Parameter counts of the spec (fp32 model, sine PE table included).
PARAMS = {
    "cct_2_3x2_32": 283_723, "cct_4_3x2_32": 482_123, "cct_6_3x1_32": 3_233_803, "cct_6_3x2_32": 3_326_923,
    "cct_7_3x1_32": 3_760_139, "cct_7_3x1_32_c100": 3_783_269, "cct_7_3x2_32": 3_853_259,
    "cct_7_7x2_224": 4_573_735, "cct_14_7x2_224": 22_367_273, "cct_14_7x2_384": 22_513_193,
    "cct_14_7x2_384_fl": 22_167_463,
}
# The spec gives these to 3 decimals in millions.
PARAMS_M = {
    "vit_lite_2_4_32": 0.215, "vit_lite_4_4_32": 0.413, "vit_lite_6_4_32": 3.191, "vit_lite_7_4_32": 3.717,
    "cvt_2_4_32": 0.215, "cvt_4_4_32": 0.413, "cvt_6_4_32": 3.190, "cvt_7_4_32": 3.717,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def sine_twin(name):
    for suffix in ("_c100", "_fl"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + "_sine" + suffix
    return name + "_sine"


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_cct_parameter_counts(name):
    assert n_params(cct_kernels.create_model(name)) == PARAMS[name]
    assert n_params(cct_kernels.create_model(sine_twin(name))) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_patch_model_parameter_counts(name):
    for variant in (name, sine_twin(name)):
        assert round(n_params(cct_kernels.create_model(variant)) / 1e6, 3) == PARAMS_M[name]


def test_every_listed_model_builds_and_is_a_top_level_factory():
    names = cct_kernels.list_models()
    assert len(names) == 46 + 12  # image factories (with _sine twins and vit_ aliases) + the text models
    assert sorted(cct_kernels.TEXT_MODELS) == sorted(n for n in names if n.startswith("text_"))
    for name in names:
        assert getattr(cct_kernels, name) is cct_kernels.MODELS[name]
    assert cct_kernels.vit_2_4_32 is cct_kernels.vit_lite_2_4_32


def test_state_dict_keys_order_and_shapes_cct_14_7x2_224():
    sd = cct_kernels.cct_14_7x2_224().state_dict()
    keys = list(sd)
    expected_head = [
        "tokenizer.conv_layers.0.0.weight", "tokenizer.conv_layers.1.0.weight", "classifier.positional_emb",
        "classifier.attention_pool.weight", "classifier.attention_pool.bias",
    ]
    block = ["pre_norm.weight", "pre_norm.bias", "self_attn.qkv.weight", "self_attn.proj.weight",
             "self_attn.proj.bias", "linear1.weight", "linear1.bias", "norm1.weight", "norm1.bias",
             "linear2.weight", "linear2.bias"]
    expected = expected_head + [f"classifier.blocks.{i}.{k}" for i in range(14) for k in block] + [
        "classifier.norm.weight", "classifier.norm.bias", "classifier.fc.weight", "classifier.fc.bias"]
    assert keys == expected
    shapes = {
        "tokenizer.conv_layers.0.0.weight": (64, 3, 7, 7), "tokenizer.conv_layers.1.0.weight": (384, 64, 7, 7),
        "classifier.positional_emb": (1, 196, 384), "classifier.attention_pool.weight": (1, 384),
        "classifier.attention_pool.bias": (1,), "classifier.blocks.3.self_attn.qkv.weight": (1152, 384),
        "classifier.blocks.3.linear1.weight": (1152, 384), "classifier.blocks.3.linear1.bias": (1152,),
        "classifier.blocks.3.linear2.weight": (384, 1152), "classifier.fc.weight": (1000, 384),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_key_counts_and_patch_model_keys():
    assert len(cct_kernels.cct_7_3x1_32().state_dict()) == 85
    vit = list(cct_kernels.vit_lite_7_4_32().state_dict())
    assert vit[:4] == ["tokenizer.conv_layers.0.0.weight", "tokenizer.conv_layers.0.0.bias",
                       "classifier.class_emb", "classifier.positional_emb"]
    assert not any("attention_pool" in k for k in vit)
    cvt = list(cct_kernels.cvt_7_4_32().state_dict())
    assert "tokenizer.conv_layers.0.0.bias" in cvt and "classifier.attention_pool.weight" in cvt
    assert "classifier.class_emb" not in cvt


@pytest.mark.parametrize("name,image,tokens", [
    ("cct_2_3x2_32", 32, 64), ("cct_7_3x1_32", 32, 256), ("cvt_2_4_32", 32, 64), ("vit_lite_2_4_32", 32, 65),
    ("cct_7_7x2_224", 224, 196),
])
def test_forward_shape_and_token_count(name, image, tokens):
    model = cct_kernels.create_model(name, backend="eager").eval()
    assert model.classifier.positional_emb.shape[1] == tokens
    out = model(torch.randn(2, 3, image, image))
    assert out.shape == (2, model.classifier.fc.out_features)
    assert torch.isfinite(out).all()


def test_sine_factories_build_the_fixed_sine_table():
    model = cct_kernels.cct_7_3x1_32_sine()
    pe = model.classifier.positional_emb
    assert not pe.requires_grad
    p, i, dim = 5, 6, pe.shape[2]
    assert pe[0, p, i].item() == pytest.approx(torch.tensor(p / 10000 ** (2 * (i // 2) / dim)).sin().item())
    assert pe[0, p, i + 1].item() == pytest.approx(torch.tensor(p / 10000 ** (2 * (i // 2) / dim)).cos().item())
    assert "classifier.positional_emb" in model.state_dict()


def test_rectangular_images():
    model = cct_kernels.CCT(img_size=(32, 48), embedding_dim=128, n_conv_layers=1, kernel_size=3, stride=1,
                            padding=1, num_layers=1, num_heads=2, mlp_ratio=1, num_classes=5).eval()
    assert model.token_grid == (16, 24)
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 5)


def test_no_positional_embedding_accepts_other_sizes():
    model = cct_kernels.cct_2_3x2_32(positional_embedding="none").eval()
    assert model.classifier.positional_emb is None
    assert model(torch.randn(1, 3, 24, 24)).shape == (1, 10)


def test_eval_is_deterministic():
    model = cct_kernels.cct_2_3x2_32(backend="eager").eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x), model(x))


def test_train_mode_is_random_and_seeded():
    model = cct_kernels.cct_2_3x2_32(backend="eager", dropout=0.1).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    c = model(x)
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("config", [
    dict(num_layers=2, num_heads=2, mlp_ratio=1, embedding_dim=128, kernel_size=3, n_conv_layers=2, img_size=32,
         num_classes=10),
    dict(num_layers=1, num_heads=4, mlp_ratio=2, embedding_dim=256, kernel_size=7, n_conv_layers=2, img_size=64,
         num_classes=7),
    dict(num_layers=2, num_heads=2, mlp_ratio=1, embedding_dim=128, kernel_size=3, n_conv_layers=1, img_size=16,
         num_classes=3, positional_embedding="sine"),
])
def test_same_function_as_vit_pytorch_cct(config):
    from tests.official import official_cct

    official = official_cct(**config).double().eval()
    stride = max(1, config["kernel_size"] // 2 - 1)
    padding = max(1, config["kernel_size"] // 2)
    ours = cct_kernels.CCT(stride=stride, padding=padding, backend="eager", **config).double().eval()
    assert list(ours.state_dict()) == list(official.state_dict())
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 3, config["img_size"], config["img_size"], dtype=torch.float64)
    torch.testing.assert_close(ours(x), official(x), rtol=1e-10, atol=1e-10)


def test_training_step_gradients_match_float64():
    torch.manual_seed(0)
    model = cct_kernels.cct_2_3x2_32(backend="eager").train()
    model64 = cct_kernels.cct_2_3x2_32(backend="eager").double().train()
    model64.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    grads = []
    for m, inp in ((model, x), (model64, x.double())):
        torch.manual_seed(123)  # the same dropout and drop-path draws in both runs
        torch.nn.functional.cross_entropy(m(inp), y).backward()
        grads.append({k: p.grad for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == sum(p.requires_grad for p in model.parameters())
    for key, g in grads[0].items():
        ref = grads[1][key]
        err = (g.double() - ref).abs().max().item()
        assert err <= 1e-4 * ref.abs().max().item() + 1e-6, (key, err)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="positional_embedding must be one of"):
        cct_kernels.cct_7_3x1_32(positional_embedding="sinus")
    model = cct_kernels.cct_7_3x1_32(backend="eager")
    with pytest.raises(ValueError, match=r"gives 225 tokens .* has 256"):
        model(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown model"):
        cct_kernels.create_model("cct_9_3x1_32")
    with pytest.raises(ValueError, match="unknown backend"):
        cct_kernels.cct_7_3x1_32(backend="fast")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        cct_kernels.CVT(img_size=30, kernel_size=4)


def test_sizes_table_matches_spec():
    assert SIZES[14] == (14, 6, 384, 3)
    for layers, heads, dim, _ in SIZES.values():
        assert dim // heads == 64
