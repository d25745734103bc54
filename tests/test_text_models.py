"""The paper's text models (spec: shared/spec/text-cct.md): official parameters and state_dict layout, the masked
semantics (padding-invariance, real tokens only), masks through the ops, clear errors, and learning."""
import pytest
import torch

import cct_kernels
from cct_kernels import ops, reference

SMALL = dict(vocab_size=1000, seq_len=64, num_classes=5)
# Parameter counts of the official modules with SMALL (the sine table counted, as nn.Module does).
PARAMS = {
    "text_cct_2": 657382, "text_cct_4": 855782, "text_cct_6": 3775974,
    "text_cvt_2": 655206, "text_cvt_4": 853606, "text_cvt_6": 1249382,
    "text_vit_2": 655333, "text_vit_4": 853733, "text_vit_6": 3771877,
    "text_transformer_2": 1406405, "text_transformer_4": 2490605, "text_transformer_6": 4656605,
}
# Positional-embedding rows at seq_len 64: tokens (+ class token) + the official leading "padding idx" row.
PE_ROWS = {"text_cct": 34, "text_cvt": 17, "text_vit": 18, "text_transformer": 66}


def _family(name):
    return name.rsplit("_", 1)[0]


def _lengths_mask(lengths, seq_len):
    return torch.arange(seq_len)[None, :] < torch.as_tensor(lengths)[:, None]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_official_parameter_count_and_layout(name):
    model = cct_kernels.create_model(name, **SMALL)
    assert name in cct_kernels.list_models()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    sd = model.state_dict()
    assert sd["embedder.embeddings.weight"].shape == (1000, 300)
    assert sd["classifier.positional_emb"].shape[1] == PE_ROWS[_family(name)]
    assert ("classifier.class_emb" in sd) == (_family(name) in ("text_vit", "text_transformer"))
    assert ("classifier.attention_pool.weight" in sd) == (_family(name) in ("text_cct", "text_cvt"))
    if _family(name) != "text_transformer":
        conv = sd["tokenizer.conv_layers.0.weight"]
        assert conv.shape[1:] == (1, 4, 300) and "tokenizer.conv_layers.0.bias" not in sd


def test_state_dict_keys_of_text_cct_2_in_official_order():
    keys = list(cct_kernels.text_cct_2(**SMALL).state_dict())
    assert keys[:5] == ["embedder.embeddings.weight", "tokenizer.conv_layers.0.weight", "classifier.positional_emb",
                        "classifier.attention_pool.weight", "classifier.attention_pool.bias"]
    block = [k[len("classifier.blocks.0."):] for k in keys if k.startswith("classifier.blocks.0.")]
    assert block == ["pre_norm.weight", "pre_norm.bias", "self_attn.qkv.weight", "self_attn.proj.weight",
                     "self_attn.proj.bias", "linear1.weight", "linear1.bias", "norm1.weight", "norm1.bias",
                     "linear2.weight", "linear2.bias"]
    assert keys[-4:] == ["classifier.norm.weight", "classifier.norm.bias", "classifier.fc.weight",
                         "classifier.fc.bias"]


def test_sine_table_has_the_official_zero_padding_row_and_positions_from_zero():
    model = cct_kernels.text_cct_2(**SMALL)
    table = model.classifier.positional_emb
    assert not table.requires_grad and torch.equal(table[0, 0], torch.zeros(128))
    expected = cct_kernels.nn.sinusoidal_embedding(33, 128)
    assert torch.equal(model.classifier.positional_table(), expected)


def _prefix_logits(model, ids, mask):
    """Independent oracle: per sentence, run the UNMASKED blocks over its real tokens only."""
    x = model.embedder(ids, mask)
    if hasattr(model, "tokenizer"):
        x, token_mask = model.tokenizer(x, mask)
    else:
        token_mask = mask
    classifier, out = model.classifier, []
    for b in range(ids.shape[0]):
        n = int(token_mask[b].sum())
        assert token_mask[b, :n].all(), "real tokens must form a prefix for this oracle"
        tokens = x[b:b + 1, :n]
        if not classifier.seq_pool:
            tokens = torch.cat((classifier.class_emb, tokens), dim=1)
        tokens = tokens + classifier.positional_table()[:, :tokens.shape[1]]
        for block in classifier.blocks:
            tokens = block(tokens)
        tokens = classifier.norm(tokens)
        pooled = (reference.pool_by_scores(classifier.attention_pool(tokens), tokens) if classifier.seq_pool
                  else tokens[:, 0])
        out.append(classifier.fc(pooled))
    return torch.cat(out)


@pytest.mark.parametrize("name", ["text_cct_2", "text_cvt_6", "text_vit_2", "text_transformer_4"])
def test_masked_model_equals_the_model_run_on_real_tokens_only(name):
    model = cct_kernels.create_model(name, **SMALL).double().eval()
    ids = torch.randint(0, 1000, (4, 64))
    mask = _lengths_mask([1, 17, 40, 64], 64)
    torch.testing.assert_close(model(ids, mask), _prefix_logits(model, ids, mask), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", sorted(PE_ROWS))
def test_logits_do_not_depend_on_padding(family):
    """The same sentences padded to 64 and to 96 words, with different padding ids: the same logits.

    (A sentence that fills all 64 words would differ: the 64-word model has no room for the tokens whose windows
    reach past its end, which the 96-word model keeps. So the longest sentence here leaves 4 words of padding.)"""
    short = cct_kernels.create_model(f"{family}_2", **SMALL).double().eval()
    long = cct_kernels.create_model(f"{family}_2", **{**SMALL, "seq_len": 96}).double().eval()
    weights = {k: v for k, v in short.state_dict().items() if k != "classifier.positional_emb"}
    long.load_state_dict(weights, strict=False)
    lengths = [1, 9, 33, 60]
    ids = torch.randint(2, 1000, (4, 96))
    mask = _lengths_mask(lengths, 96)
    noisy = torch.where(mask, ids, torch.randint(0, 1000, ids.shape))
    expected = short(ids[:, :64], mask[:, :64])
    torch.testing.assert_close(long(ids, mask), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(long(noisy, mask), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(long(ids, mask.sum(1)), expected, rtol=1e-10, atol=1e-10)  # lengths form


def test_all_real_mask_equals_no_mask():
    model = cct_kernels.text_cct_2(**SMALL).double().eval()
    ids = torch.randint(0, 1000, (2, 64))
    torch.testing.assert_close(model(ids, torch.ones(2, 64, dtype=torch.bool)), model(ids), rtol=1e-12, atol=1e-12)


def test_gradients_are_finite_and_padding_rows_get_none():
    model = cct_kernels.text_vit_2(**SMALL).train()
    ids = torch.randint(2, 1000, (3, 64))
    ids[0, 5:] = 999  # a token id used only in padding
    mask = _lengths_mask([5, 64, 1], 64)
    ids[1:, :] = torch.where(ids[1:] == 999, 998, ids[1:])
    model(ids, mask).logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert model.embedder.embeddings.weight.grad[999].abs().max() == 0


def test_bad_inputs_are_clear_errors():
    model = cct_kernels.text_cct_2(**SMALL)
    ids = torch.randint(0, 1000, (2, 64))
    with pytest.raises(ValueError, match="seq_len=64"):
        model(ids[:, :50])
    with pytest.raises(TypeError, match="integer tensor"):
        model(ids.float())
    with pytest.raises(TypeError, match="bool tensor"):
        model(ids, torch.ones(2, 64))
    with pytest.raises(ValueError, match=r"mask must have the token ids' shape \(2, 64\)"):
        model(ids, torch.ones(2, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        cct_kernels.text_cvt_2(**{**SMALL, "seq_len": 62})
    with pytest.raises(ValueError, match="no official text checkpoints"):
        cct_kernels.create_model("text_cct_2", pretrained=True)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 1000\), got values from \d+ to 1000"):
        model(torch.cat([ids[:, :63], torch.full((2, 1), 1000)], dim=1))
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1, got 0"):
        cct_kernels.text_cct_2(vocab_size=0)
    with pytest.raises(ValueError, match=r"padding_idx must be None or in \[0, vocab_size=1\), got 1"):
        cct_kernels.text_cct_2(vocab_size=1)


def test_ops_accept_both_mask_forms_and_refuse_bad_ones():
    qkv, x, w, b = torch.randn(3, 7, 24), torch.randn(3, 7, 8), torch.randn(1, 8), torch.randn(1)
    lengths = torch.tensor([7, 3, 1])
    as_bool = _lengths_mask(lengths, 7)
    torch.testing.assert_close(ops.attention(qkv, 2, mask=lengths), ops.attention(qkv, 2, mask=as_bool))
    torch.testing.assert_close(ops.seqpool(x, w, b, mask=lengths), ops.seqpool(x, w, b, mask=as_bool))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 8\), got values from 1 to 8"):
        ops.attention(qkv, 2, mask=torch.tensor([8, 1, 1]))
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 7\)"):
        ops.seqpool(x, w, b, mask=as_bool[:, :6])
    with pytest.raises(TypeError, match="bool tensor or"):
        ops.seqpool(x, w, b, mask=as_bool.float())


def test_masked_ops_against_float64_loops():
    """Each sequence's real prefix alone, unmasked, in float64: what the masked float32 ops must give."""
    qkv, x, w, b = torch.randn(3, 9, 48), torch.randn(3, 9, 16), torch.randn(1, 16), torch.randn(1)
    lengths = [9, 4, 1]
    att = ops.attention(qkv, 2, mask=torch.tensor(lengths))
    pooled = ops.seqpool(x, w, b, mask=torch.tensor(lengths))
    for i, n in enumerate(lengths):
        full = cct_kernels.reference.attention(qkv[i:i + 1].double(), 2)
        real_keys = cct_kernels.reference.attention(qkv[i:i + 1, :n].double(), 2)
        torch.testing.assert_close(att[i:i + 1, :n].double(), real_keys, rtol=1e-5, atol=1e-5)
        if n == 9:
            torch.testing.assert_close(att[i:i + 1].double(), full, rtol=1e-5, atol=1e-5)
        expected = cct_kernels.reference.seqpool(x[i:i + 1, :n].double(), w.double(), b.double())
        torch.testing.assert_close(pooled[i:i + 1].double(), expected, rtol=1e-5, atol=1e-5)


def test_sequence_with_no_real_token_gives_zeros_and_no_nan():
    qkv = torch.randn(2, 5, 24, requires_grad=True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    w, b = torch.randn(1, 8), torch.randn(1)
    att = ops.attention(qkv, 2, mask=torch.tensor([0, 5]))
    pooled = ops.seqpool(x, w, b, mask=torch.tensor([0, 5]))
    assert att[0].abs().max() == 0 and pooled[0].abs().max() == 0
    (att.sum() + pooled.sum()).backward()
    assert torch.isfinite(qkv.grad).all() and torch.isfinite(x.grad).all()


def _pattern_task(n, seq_len, generator):
    """Sequences of random length; the label says whether token 7 occurs before token 8 (or neither)."""
    ids = torch.randint(10, 50, (n, seq_len), generator=generator)
    lengths = torch.randint(4, seq_len + 1, (n,), generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    for i in range(n):
        a, c = sorted(torch.randperm(int(lengths[i]), generator=generator)[:2].tolist())
        if labels[i] == 1:
            ids[i, a], ids[i, c] = 7, 8
        elif labels[i] == 2:
            ids[i, a], ids[i, c] = 8, 7
    mask = _lengths_mask(lengths, seq_len)
    return torch.where(mask, ids, torch.ones_like(ids)), mask, labels


@pytest.mark.parametrize("family", sorted(PE_ROWS))
def test_every_family_learns_a_planted_pattern(family):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    ids, mask, labels = _pattern_task(192, 16, generator)
    model = cct_kernels.create_model(f"{family}_2", vocab_size=50, seq_len=16, num_classes=3,
                                     word_embedding_dim=32, positional_embedding="learnable")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        batch = slice((step % 6) * 32, (step % 6 + 1) * 32)
        loss = torch.nn.functional.cross_entropy(model(ids[batch], mask[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.6 * first, (family, first, last)
