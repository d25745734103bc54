"""load_checkpoint: official checkpoints load strictly; resolution and class-count changes are adapted."""
import pytest
import torch
import torch.nn.functional as F

import cct_kernels
from cct_kernels.models.checkpoint import resize_positional_embedding


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


def test_mismatched_checkpoint_is_refused():
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        cct_kernels.load_checkpoint(cct_kernels.cct_7_3x1_32(), cct_kernels.cct_2_3x2_32().state_dict())
    with pytest.raises(TypeError, match="checkpoint path or a state_dict"):
        cct_kernels.load_checkpoint(cct_kernels.cct_2_3x2_32(), 42)
