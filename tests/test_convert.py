"""convert(): official-style models (vit-pytorch's CCT, or any module with the official names) become ours.

The vit-pytorch cases skip with a reason where vit-pytorch is absent (tests/official.py); the rest always run.
"""
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import cct_kernels
from tests.official import official_cct

VARIANTS = {
    "cct_2_3x2_32": dict(num_layers=2, num_heads=2, mlp_ratio=1, embedding_dim=128, kernel_size=3, n_conv_layers=2,
                         img_size=32, num_classes=10),
    "cct_7_3x1_32_sine": dict(num_layers=7, num_heads=4, mlp_ratio=2, embedding_dim=256, kernel_size=3,
                              n_conv_layers=1, img_size=32, num_classes=10, positional_embedding="sine"),
    "cct_7x2_at_64": dict(num_layers=2, num_heads=4, mlp_ratio=2, embedding_dim=256, kernel_size=7,
                          n_conv_layers=2, img_size=64, num_classes=102),
    "no_pe_1_channel": dict(num_layers=1, num_heads=2, mlp_ratio=1, embedding_dim=128, kernel_size=3,
                            n_conv_layers=1, img_size=28, num_classes=10, positional_embedding="none",
                            n_input_channels=1),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_convert_vit_pytorch_cct(name):
    config = VARIANTS[name]
    official = official_cct(**config).eval()
    ours = cct_kernels.convert(official, backend="eager")
    assert isinstance(ours, cct_kernels.CCT) and not ours.training
    assert list(ours.state_dict()) == list(official.state_dict())
    size = config["img_size"]
    x = torch.randn(2, config.get("n_input_channels", 3), size, size)
    torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)
    drop = [getattr(b.drop_path, "drop_prob", 0.0) for b in ours.classifier.blocks]
    assert drop == pytest.approx([getattr(b.drop_path, "drop_prob", 0.0) for b in official.classifier.blocks])
    assert ours.classifier.blocks[0].self_attn.attn_drop.p == official.classifier.blocks[0].self_attn.attn_drop.p


@pytest.mark.parametrize("factory", ["cvt_2_4_32", "vit_lite_2_4_32_sine", "cct_2_3x2_32"])
def test_convert_round_trips_our_own_models(factory):
    source = cct_kernels.create_model(factory, backend="eager").double().train()
    converted = cct_kernels.convert(source)
    assert type(converted) is type(source) and converted.training
    assert next(converted.parameters()).dtype == torch.float64
    source.eval(), converted.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(converted(x), source(x))


# Runs pytest in a child process where `import vit_pytorch` fails as it does on an image without the package:
# None in sys.modules is how the import system marks a module as unavailable (find_spec returns None too).
_WITHOUT_VIT_PYTORCH = ("import sys; sys.modules['vit_pytorch'] = None; "
                        "import pytest; sys.exit(pytest.main(sys.argv[1:]))")


def _pytest_without_vit_pytorch(*args):
    root = pathlib.Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", _WITHOUT_VIT_PYTORCH, *args, "-p", "no:cacheprovider"],
                          cwd=root, capture_output=True, text=True, timeout=300)


def test_collection_has_no_errors_without_vit_pytorch():
    result = _pytest_without_vit_pytorch("tests", "--collect-only", "-q")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^\d+ tests collected", result.stdout, re.M), result.stdout[-2000:]
    assert "error" not in result.stdout.splitlines()[-1].lower()
    assert "tests/test_convert.py::test_convert_vit_pytorch_cct[cct_2_3x2_32]" in result.stdout


def test_vit_pytorch_cases_skip_with_a_reason_without_it():
    result = _pytest_without_vit_pytorch("tests/test_convert.py", "-q", "-rs", "-k", "vit_pytorch_cct")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(VARIANTS)} skipped" in result.stdout
    assert "vit-pytorch is not installed" in result.stdout
