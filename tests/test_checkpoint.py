"""load_checkpoint: official checkpoints load strictly; resolution and class-count changes are adapted; bad files
and other architectures are reported clearly. Also convert()'s refusal of modules it cannot convert."""
import re

import pytest
import torch
import torch.nn.functional as F

import cct_kernels
from cct_kernels.models.checkpoint import CheckpointError, resize_positional_embedding


def test_official_checkpoint_loads_from_a_file(tmp_path):
    from tests.official import official_cct

    official = official_cct(num_layers=2, num_heads=2, mlp_ratio=1, embedding_dim=128, kernel_size=3,
                            n_conv_layers=2, img_size=32, num_classes=10).eval()
    path = tmp_path / "cct_2_3x2_32.pth"
    torch.save(official.state_dict(), path)
    ours = cct_kernels.cct_2_3x2_32(pretrained=str(path), backend="eager").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), official(x))


def test_nested_state_dict_is_unwrapped():
    source = cct_kernels.cct_2_3x2_32()
    model = cct_kernels.load_checkpoint(cct_kernels.cct_2_3x2_32(), {"state_dict": source.state_dict(), "epoch": 3})
    assert torch.equal(model.classifier.fc.weight, source.classifier.fc.weight)


def test_positional_embedding_is_resized_bilinearly():
    source = cct_kernels.cct_7_3x1_32()  # 16x16 token grid
    model = cct_kernels.cct_7_3x1_32(img_size=48, backend="eager")  # 24x24
    cct_kernels.load_checkpoint(model, source.state_dict())
    grid = source.classifier.positional_emb.detach().reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(24, 24), mode="bilinear").permute(0, 2, 3, 1).reshape(1, 576, -1)
    torch.testing.assert_close(model.classifier.positional_emb.detach(), expected)
    assert torch.equal(model.classifier.blocks[0].linear1.weight, source.classifier.blocks[0].linear1.weight)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_vit_lite_class_token_position_is_kept_when_resizing():
    pe = torch.randn(1, 1 + 64, 8)
    out = resize_positional_embedding(pe, (4, 4), num_prefix_tokens=1)
    assert out.shape == (1, 17, 8) and torch.equal(out[:, 0], pe[:, 0])


def test_sine_table_is_recomputed_not_interpolated():
    source = cct_kernels.cct_7_3x1_32_sine()
    model = cct_kernels.cct_7_3x1_32_sine(img_size=48)
    own = model.classifier.positional_emb.clone()
    cct_kernels.load_checkpoint(model, source.state_dict())
    assert torch.equal(model.classifier.positional_emb, own)


def test_new_class_count_keeps_a_fresh_head():
    source = cct_kernels.cct_7_3x1_32()
    model = cct_kernels.cct_7_3x1_32(num_classes=100)
    fc = model.classifier.fc.weight.clone()
    cct_kernels.load_checkpoint(model, source.state_dict())
    assert torch.equal(model.classifier.fc.weight, fc)
    assert torch.equal(model.classifier.norm.weight, source.classifier.norm.weight)


def test_another_architecture_is_reported_as_such_not_as_a_resize_problem():
    # cct_2_3x2_32 (2 blocks, dim 128, 64 tokens) into cct_7_3x1_32 (7 blocks, dim 256, 256 tokens): the PE width
    # differs, so no resize is attempted; the message says which keys are missing and which shapes differ.
    with pytest.raises(CheckpointError) as caught:
        cct_kernels.load_checkpoint(cct_kernels.cct_7_3x1_32(), cct_kernels.cct_2_3x2_32().state_dict())
    message = str(caught.value)
    assert "does not fit this CCT (saved from another architecture?" in message
    assert "checkpoint: 2 encoder blocks, embedding_dim 128; model: 7 encoder blocks, embedding_dim 256" in message
    assert "missing keys: classifier.blocks.2.pre_norm.weight" in message
    assert ("shape mismatches: tokenizer.conv_layers.0.0.weight checkpoint (64, 3, 3, 3) vs model (256, 3, 3, 3)"
            in message)
    assert "classifier.positional_emb checkpoint (1, 64, 128) vs model (1, 256, 256)" in message
    assert "resize" not in message
    assert isinstance(caught.value, RuntimeError) and isinstance(caught.value, ValueError)
    # ViT-Lite weights into a CVT: same shapes, other keys.
    with pytest.raises(CheckpointError, match=r"2 missing keys: classifier.attention_pool.weight, classifier."
                                              r"attention_pool.bias; 1 unexpected keys: classifier.class_emb"):
        cct_kernels.load_checkpoint(cct_kernels.cvt_2_4_32(), cct_kernels.vit_lite_2_4_32().state_dict())
    with pytest.raises(TypeError, match="checkpoint path or a state_dict"):
        cct_kernels.load_checkpoint(cct_kernels.cct_2_3x2_32(), 42)


def test_non_strict_loading_skips_missing_keys_but_not_shape_mismatches():
    source = cct_kernels.cct_2_3x2_32().state_dict()
    del source["classifier.norm.weight"]
    model = cct_kernels.load_checkpoint(cct_kernels.cct_2_3x2_32(), dict(source), strict=False)
    assert torch.equal(model.classifier.blocks[0].linear1.weight, source["classifier.blocks.0.linear1.weight"])
    with pytest.raises(CheckpointError, match="1 missing keys: classifier.norm.weight"):
        cct_kernels.load_checkpoint(cct_kernels.cct_2_3x2_32(), dict(source))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        cct_kernels.load_checkpoint(cct_kernels.cct_7_3x1_32(), cct_kernels.cct_2_3x2_32().state_dict(), strict=False)


@pytest.mark.parametrize("content,expected", [
    (b"", "is empty (0 bytes)"),
    (b"this is not a checkpoint at all\n", "cannot read checkpoint"),
    ("truncated", "cannot read checkpoint"),
])
def test_unreadable_files_name_the_file_and_what_was_expected(tmp_path, content, expected):
    path = tmp_path / "weights.pth"
    if content == "truncated":
        torch.save(cct_kernels.cct_2_3x2_32().state_dict(), path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        cct_kernels.load_checkpoint(cct_kernels.cct_2_3x2_32(), path)
    message = str(caught.value)
    assert str(path) in message and expected in message and "torch.save(model.state_dict(), path)" in message


@pytest.mark.parametrize("payload,expected", [
    (torch.zeros(3), "holds a Tensor"),
    ([1, 2, 3], "holds a list"),
    ({}, "is empty"),
    ({"epoch": 3, "classifier.fc.weight": torch.zeros(1)}, "entries that are not (name, tensor) pairs: 'epoch'"),
])
def test_files_that_are_not_state_dicts_are_refused(tmp_path, payload, expected):
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=re.escape(expected)) as caught:
        cct_kernels.load_checkpoint(cct_kernels.cct_2_3x2_32(), path)
    assert str(path) in str(caught.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint {tmp_path / 'none.pth'} does not exist")):
        cct_kernels.load_checkpoint(cct_kernels.cct_2_3x2_32(), tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="is not a file"):
        cct_kernels.load_checkpoint(cct_kernels.cct_2_3x2_32(), tmp_path)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_ddp_and_compile_prefixes_are_stripped(prefix):
    source = cct_kernels.cct_2_3x2_32()
    wrapped = {prefix + key: value for key, value in source.state_dict().items()}
    model = cct_kernels.load_checkpoint(cct_kernels.cct_2_3x2_32(), {"model": wrapped, "step": 10})
    assert torch.equal(model.classifier.fc.weight, source.classifier.fc.weight)


def test_headless_model_ignores_the_checkpoint_head_and_headless_weights_get_a_fresh_head():
    source = cct_kernels.cct_2_3x2_32()
    headless = cct_kernels.load_checkpoint(cct_kernels.cct_2_3x2_32(num_classes=0), source.state_dict())
    assert torch.equal(headless.classifier.norm.weight, source.classifier.norm.weight)
    model = cct_kernels.cct_2_3x2_32()
    fc = model.classifier.fc.weight.clone()
    cct_kernels.load_checkpoint(model, headless.state_dict())
    assert torch.equal(model.classifier.fc.weight, fc)
    assert torch.equal(model.classifier.blocks[1].linear2.weight, source.classifier.blocks[1].linear2.weight)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the Linear(128, 0) built below
def test_convert_refuses_modules_that_are_not_cct_style():
    with pytest.raises(TypeError, match=r"convert\(\) accepts an official-style CCT / CVT / ViT-Lite nn.Module.*"
                                        r"this Linear has no tokenizer.conv_layers"):
        cct_kernels.convert(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="got a OrderedDict, not an nn.Module"):
        cct_kernels.convert(cct_kernels.cct_2_3x2_32().state_dict())
    broken = cct_kernels.cct_2_3x2_32()
    broken.classifier.blocks[1].linear1 = None
    with pytest.raises(TypeError, match="classifier.blocks.1 has no linear1"):
        cct_kernels.convert(broken)
    zero_head = cct_kernels.cct_2_3x2_32()
    zero_head.classifier.fc = torch.nn.Linear(128, 0)
    with pytest.raises(ValueError, match="Linear with 0 outputs"):
        cct_kernels.convert(zero_head)


def test_convert_of_a_headless_model_gives_a_headless_model():
    source = cct_kernels.cct_2_3x2_32(backend="eager").eval()
    source.classifier.fc = torch.nn.Identity()
    converted = cct_kernels.convert(source)
    assert converted.num_classes == 0
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(converted(x), source(x))


def _cct_with(change):
    model = cct_kernels.cct_2_3x2_32(backend="eager")
    change(model)
    return model


@pytest.mark.parametrize("change,message", [
    (lambda m: m.tokenizer.conv_layers[0].__setitem__(1, torch.nn.GELU()),
     "tokenizer.conv_layers.0 has GELU; our tokenizer computes Conv2d, then ReLU or nothing"),
    (lambda m: setattr(m.tokenizer.conv_layers[1][0], "dilation", (2, 2)),
     "tokenizer.conv_layers.1.0 has groups 1, dilation (2, 2)"),
    (lambda m: setattr(m.tokenizer.conv_layers[1][0], "stride", (2, 2)),
     "tokenizer.conv_layers.1 differs from stage 0"),
    (lambda m: setattr(m.tokenizer.conv_layers[0][0], "stride", (1, 2)),
     "tokenizer.conv_layers.0 has stride (1, 2); our tokenizer supports square ones only"),
    (lambda m: setattr(m.tokenizer.conv_layers[0][2], "ceil_mode", True),
     "max pool has dilation 1, ceil_mode True"),
])
def test_convert_refuses_tokenizers_it_would_compute_differently(change, message):
    # Each of these loads the same weights into our model and would silently give other outputs.
    with pytest.raises(ValueError, match=re.escape(message)):
        cct_kernels.convert(_cct_with(change))


def test_convert_refuses_a_patch_embedding_with_overlapping_patches():
    model = cct_kernels.cvt_2_4_32(backend="eager")
    model.tokenizer.conv_layers[0][0].stride = (2, 2)
    with pytest.raises(ValueError, match="patch embedding .* stride = kernel_size"):
        cct_kernels.convert(model)


def test_load_checkpoint_into_a_model_that_is_not_ours_is_a_type_error():
    with pytest.raises(TypeError, match="load_checkpoint loads into a CCT, CVT or ViTLite"):
        cct_kernels.load_checkpoint(torch.nn.Linear(2, 2), {"weight": torch.zeros(2, 2)})


def test_convert_keeps_a_declared_rectangular_image_size():
    source = cct_kernels.CCT(img_size=(32, 48), embedding_dim=16, num_layers=1, num_heads=2, kernel_size=3, stride=1,
                             padding=1, num_classes=3, backend="eager").eval()
    converted = cct_kernels.convert(source)
    assert converted.img_size == (32, 48) and converted.token_grid == (16, 24)
    x = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(converted(x), source(x))


def test_learned_embedding_into_a_sine_model_of_another_size_is_resized_not_replaced():
    # The PE's values decide, not the model's kind: learned values are resized; only a sine table is recomputed.
    source = cct_kernels.cct_7_3x1_32()  # learned, 16x16 grid
    model = cct_kernels.cct_7_3x1_32_sine(img_size=48)  # 24x24
    cct_kernels.load_checkpoint(model, source.state_dict())
    expected = resize_positional_embedding(source.classifier.positional_emb.detach(), (24, 24))
    torch.testing.assert_close(model.classifier.positional_emb.detach(), expected)
