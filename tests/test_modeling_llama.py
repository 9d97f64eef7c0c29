"""modeling_llama: a pack trains exactly as its sequences run alone; HF checkpoints load as-is."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
import transformers

from longalign.constants import IGNORE_INDEX
from longalign.attention import positions_from_cu_seqlens
from modeling_llama import LlamaForCausalLM

VOCAB = 128
LENGTHS = [9, 3, 16, 1, 11]


def _config(**overrides):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               initializer_range=0.1, attn_implementation="sdpa")
    cfg.update(overrides)
    return transformers.LlamaConfig(**cfg)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


def _pack(seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]
    labels = [s.clone() for s in seqs]
    for lab in labels:
        lab[: len(lab) // 3] = IGNORE_INDEX  # a prompt
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    weights = []
    for lab in labels:
        n_targets = (lab[1:] != IGNORE_INDEX).sum()
        w = torch.zeros(len(lab))
        if n_targets:
            w[1:] = (lab[1:] != IGNORE_INDEX).float() / n_targets
        weights.append(w)
    batch = dict(input_ids=torch.cat(seqs)[None], labels=torch.cat(labels)[None],
                 loss_weights=torch.cat(weights)[None], cu_seqlens=cu,
                 position_ids=positions_from_cu_seqlens(cu, sum(LENGTHS)))
    return seqs, labels, batch


def test_position_ids_restart():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu, 8).tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]


def test_packed_logits_equal_sequences_alone(model):
    seqs, _, batch = _pack()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"],
                       position_ids=batch["position_ids"]).logits[0]
        derived = model(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"]).logits[0]
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs])
    assert torch.equal(packed, derived)
    assert (packed - alone).abs().max().item() <= 1e-5


def test_changing_one_sequence_leaves_others_bit_identical(model):
    _, _, batch = _pack()
    cu = batch["cu_seqlens"].tolist()
    with torch.no_grad():
        base = model(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"]).logits[0]
        for j in range(len(LENGTHS)):
            ids = batch["input_ids"].clone()
            ids[0, cu[j + 1] - 1] = (ids[0, cu[j + 1] - 1] + 1) % VOCAB  # last token of sequence j
            ids[0, cu[j]] = (ids[0, cu[j]] + 7) % VOCAB  # and its first
            out = model(input_ids=ids, cu_seqlens=batch["cu_seqlens"]).logits[0]
            others = torch.ones(len(ids[0]), dtype=torch.bool)
            others[cu[j]:cu[j + 1]] = False
            assert torch.equal(out[others], base[others])
            assert not torch.equal(out[~others], base[~others])


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _unpacked_reference_loss(model, seqs, labels):
    """Mean over sequences (with >= 1 target) of each one's mean token loss, stock forward."""
    losses = []
    for s, lab in zip(seqs, labels):
        if (lab[1:] != IGNORE_INDEX).any():
            logits = model(input_ids=s[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1], lab[1:], ignore_index=IGNORE_INDEX))
    return torch.stack(losses).mean()


def test_weighted_packed_grads_equal_unpacked(model):
    seqs, labels, batch = _pack(1)
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    packed = _grads(model)
    model.zero_grad()
    ref = _unpacked_reference_loss(model, seqs, labels)
    ref.backward()
    unpacked = _grads(model)
    model.zero_grad()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    assert packed.keys() == unpacked.keys() and len(packed) == len(list(model.parameters()))
    for name, g in unpacked.items():
        rel = (packed[name] - g).abs().max() / g.abs().max()
        assert rel <= 1e-5, (name, rel.item())


def test_sum_reduction_and_logits_none(model):
    _, _, batch = _pack(2)
    with torch.no_grad():
        mean = model(**batch)
        total = model(**batch, loss_reduction="sum")
    assert mean.logits is None and total.logits is None
    n_seq = sum(1 for w in batch["loss_weights"][0].split(LENGTHS) if w.sum() > 0)
    torch.testing.assert_close(total.loss, mean.loss * n_seq, rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_identical_grads():
    torch.manual_seed(1)
    model = LlamaForCausalLM(_config())
    model.train()  # checkpointing is only active in training mode
    _, _, batch = _pack(3)
    model(**batch).loss.backward()
    plain = _grads(model)
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    model(**batch).loss.backward()
    ckpt = _grads(model)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-6, atol=1e-9)


def test_loads_transformers_checkpoint(tmp_path):
    torch.manual_seed(2)
    stock = transformers.LlamaForCausalLM(_config()).eval()
    stock.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert ours.state_dict().keys() == stock.state_dict().keys()
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, stock(input_ids=ids).logits)
        cu = torch.tensor([0, 13], dtype=torch.int32)
        packed = ours(input_ids=ids[:1], cu_seqlens=cu).logits
        assert (packed - stock(input_ids=ids[:1]).logits).abs().max().item() <= 1e-5
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:1], **greedy), stock.generate(ids[:1], **greedy))


def test_packed_batch_rejects_padding_mask(model):
    _, _, batch = _pack()
    with pytest.raises(ValueError):
        model(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"],
              attention_mask=torch.ones_like(batch["input_ids"]))


def test_monkey_patch_falls_back_with_warning(tmp_path):
    from llama_flash_attn_monkey_patch import replace_llama_attn_with_flash_attn, undo_llama_attn_patch

    transformers.LlamaForCausalLM(_config(attn_implementation="eager")).save_pretrained(tmp_path)
    expected = "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    try:
        with pytest.warns(RuntimeWarning) if expected == "sdpa" else nullcontext():
            assert replace_llama_attn_with_flash_attn() == expected
            replace_llama_attn_with_flash_attn()  # idempotent
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        assert loaded.config._attn_implementation == expected
        explicit = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
        assert explicit.config._attn_implementation == "eager"
        with pytest.warns(RuntimeWarning) if expected == "sdpa" else nullcontext():
            replace_llama_attn_with_flash_attn(explicit)
        assert explicit.config._attn_implementation == expected
    finally:
        undo_llama_attn_patch()
    assert "from_pretrained" not in transformers.LlamaPreTrainedModel.__dict__


def test_monkey_patch_sets_default_of_later_loads(tmp_path, monkeypatch):
    """With the choice forced to a non-default ("eager"), a plain load must get it."""
    import llama_flash_attn_monkey_patch as patch

    transformers.LlamaForCausalLM(_config()).save_pretrained(tmp_path)
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation != "eager"
    monkeypatch.setattr(patch, "best_llama_attn_implementation", lambda: "eager")
    try:
        with pytest.warns(RuntimeWarning):
            patch.replace_llama_attn_with_flash_attn()
        assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "eager"
        assert LlamaForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "eager"
    finally:
        patch.undo_llama_attn_patch()
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation != "eager"


def test_padded_batch_loss_equals_stock(tmp_path):
    """Naive/sort batches (B, L) with attention_mask: our chunked loss == transformers' loss."""
    torch.manual_seed(4)
    stock = transformers.LlamaForCausalLM(_config()).eval()
    stock.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ours.loss_chunk_size = 5
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    with torch.no_grad():
        ref = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
