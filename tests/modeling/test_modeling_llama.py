"""The Llama training model: transformers' Llama + the registered packed attention + the weighted
chunked loss. A pack trains exactly as its sequences run alone; HF checkpoints load as-is."""
import pytest
import torch
import torch.nn.functional as F
import transformers

from longalign.constants import IGNORE_INDEX
from longalign.pack_geometry import positions_from_cu_seqlens
from longalign.ops.weighted_loss import LMHeadWithLoss
from longalign.modeling.packed_attention import ATTN_IMPLEMENTATION, packed_attention_mask, register_packed_attention
from longalign.modeling.weighted_lm import LongAlignLlamaForCausalLM as LlamaForCausalLM

register_packed_attention()

VOCAB = 128
LENGTHS = [9, 3, 16, 1, 11]


def _config(**overrides):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               initializer_range=0.1, attn_implementation=ATTN_IMPLEMENTATION)
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
                 loss_weights=torch.cat(weights)[None], cu_seq_lens_q=cu,
                 position_ids=positions_from_cu_seqlens(cu, sum(LENGTHS)))
    return seqs, labels, batch


def test_position_ids_restart():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu, 8).tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]


def test_packed_logits_equal_sequences_alone(model):
    seqs, _, batch = _pack()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
                       position_ids=batch["position_ids"]).logits[0]
        derived = model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"]).logits[0]
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs])
    assert torch.equal(packed, derived)
    assert (packed - alone).abs().max().item() <= 1e-5


def test_changing_one_sequence_leaves_others_bit_identical(model):
    _, _, batch = _pack()
    cu = batch["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        base = model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"]).logits[0]
        for j in range(len(LENGTHS)):
            ids = batch["input_ids"].clone()
            ids[0, cu[j + 1] - 1] = (ids[0, cu[j + 1] - 1] + 1) % VOCAB  # last token of sequence j
            ids[0, cu[j]] = (ids[0, cu[j]] + 7) % VOCAB  # and its first
            out = model(input_ids=ids, cu_seq_lens_q=batch["cu_seq_lens_q"]).logits[0]
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
        total = model(**batch, loss_aggregation="sum")
    assert mean.logits is None and total.logits is None
    n_seq = sum(1 for w in batch["loss_weights"][0].split(LENGTHS) if w.sum() > 0)
    torch.testing.assert_close(total.loss, mean.loss * n_seq, rtol=1e-6, atol=1e-6)


@pytest.mark.integration
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
    stock = transformers.LlamaForCausalLM(_config(attn_implementation="sdpa")).eval()
    stock.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION).eval()
    assert ours.state_dict().keys() == stock.state_dict().keys()
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, stock(input_ids=ids).logits)
        cu = torch.tensor([0, 13], dtype=torch.int32)
        packed = ours(input_ids=ids[:1], cu_seq_lens_q=cu).logits
        assert (packed - stock(input_ids=ids[:1]).logits).abs().max().item() <= 1e-5
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:1], **greedy), stock.generate(ids[:1], **greedy))


def test_packed_batch_rejects_padding_mask(model):
    _, _, batch = _pack()
    with pytest.raises(ValueError):
        model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
              attention_mask=torch.ones_like(batch["input_ids"]))


def test_modules_are_transformers_own():
    """No internal module is replaced or re-typed: only the LM head (same key) computes the loss."""
    model = LlamaForCausalLM(_config())
    for layer in model.model.layers:
        assert type(layer.self_attn) is transformers.models.llama.modeling_llama.LlamaAttention
        assert "forward" not in vars(layer.self_attn)
    assert type(model.lm_head) is LMHeadWithLoss and "lm_head.weight" in model.state_dict()


def test_stock_class_runs_packs_from_transformers_flattening_collator(model, tmp_path):
    """transformers' own LlamaForCausalLM with the registered attention, fed by
    DataCollatorWithFlattening(return_flash_attn_kwargs=True), gives each sequence's own logits."""
    model.save_pretrained(tmp_path)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION)
    assert type(stock) is transformers.LlamaForCausalLM
    seqs, _, _ = _pack()
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": s.tolist()} for s in seqs])
    batch.pop("labels")
    with torch.no_grad():
        packed = stock.eval()(**batch).logits[0]
        by_positions = stock(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = torch.cat([stock(input_ids=s[None]).logits[0] for s in seqs])
    assert (packed - alone).abs().max().item() <= 1e-5
    assert torch.equal(by_positions, packed)  # boundaries derived from restarting position_ids


def test_no_mask_is_built_for_a_pack():
    """The registered mask function builds nothing for an unpadded call without cache (a pack), and
    transformers' SDPA mask once there is padding or cached keys."""
    common = dict(batch_size=1, q_length=6, kv_length=6, q_offset=0, kv_offset=0)
    assert packed_attention_mask(attention_mask=None, **common) is None
    padded = packed_attention_mask(attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]).bool(),
                                   **{**common, "allow_is_causal_skip": False})
    assert padded.shape == (1, 1, 6, 6) and not padded[0, 0, :, 4:].any()
    cached = packed_attention_mask(attention_mask=None, **{**common, "q_length": 1, "kv_offset": 0,
                                                           "kv_length": 7, "allow_is_causal_skip": False})
    assert cached is not None and cached.shape[-1] == 7


def test_padded_batch_loss_equals_stock(tmp_path):
    """Naive/sort batches (B, L) with attention_mask: our chunked loss == transformers' loss."""
    torch.manual_seed(4)
    stock = transformers.LlamaForCausalLM(_config(attn_implementation="sdpa")).eval()
    stock.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION).eval()
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_padded_and_packed_batches_match_stock(tmp_path):
    """On the GPU (bf16): a padded (B, L) batch with attention_mask and a pack through the training
    class give transformers' own Llama logits (sdpa, each sequence alone) within bf16 tolerance,
    whatever varlen backend the automatic choice takes there."""
    torch.manual_seed(5)
    stock = transformers.LlamaForCausalLM(_config(attn_implementation="sdpa")).eval()
    stock.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION,
                                            dtype=torch.bfloat16).cuda().eval()
    stock = stock.to(device="cuda", dtype=torch.bfloat16)
    seqs, _, batch = _pack(6)
    width = max(LENGTHS)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    with torch.no_grad():
        alone = [stock(input_ids=s[None].cuda()).logits[0].float() for s in seqs]
        padded = ours(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float()
        packed = ours(input_ids=batch["input_ids"].cuda(), cu_seq_lens_q=batch["cu_seq_lens_q"].cuda()).logits[0].float()
    ref = torch.cat(alone)
    scale = ref.abs().max().item()
    assert (torch.cat([padded[b, :len(s)] for b, s in enumerate(seqs)]) - ref).abs().max().item() <= 2e-2 * scale
    assert (packed - ref).abs().max().item() <= 2e-2 * scale


def test_forward_refuses_the_papers_reduction_keyword(model):
    _, _, batch = _pack()
    with pytest.raises(TypeError, match="loss_aggregation"):
        model(**batch, loss_reduction="sum")
