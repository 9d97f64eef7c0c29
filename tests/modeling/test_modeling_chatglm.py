"""The ChatGLM3 model (longalign/modeling/modeling_chatglm.py, remote code) and its training class
on tiny random configs, fp32 CPU: packing exactness, loss weighting, checkpoint layout, KV-cache
generation, chat(), gradient checkpointing, padded batches."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from longalign.constants import IGNORE_INDEX
from longalign.modeling.configuration_chatglm import ChatGLMConfig
from longalign.modeling.packed_attention import ATTN_IMPLEMENTATION, register_packed_attention
from longalign.modeling.weighted_lm import LongAlignChatGLMForConditionalGeneration as ChatGLMForConditionalGeneration

register_packed_attention()
TINY = dict(num_layers=2, padded_vocab_size=256, hidden_size=32, ffn_hidden_size=64, kv_channels=16,
            num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, seq_length=128,
            rope_ratio=2.0, attn_implementation=ATTN_IMPLEMENTATION)
LENGTHS = (7, 12, 5)  # a pack of three sequences


def tiny_model(seed=0, **overrides):
    """Random tiny ChatGLM in eval mode, norm weights perturbed away from 1 so they matter."""
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def random_pack(vocab, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, torch.cat(seqs)[None], cu, positions


def labels_for(seq, prompt_len=2):
    """HF-style labels aligned with input_ids: the first `prompt_len` tokens are not targets."""
    labels = seq.clone()
    labels[:prompt_len] = IGNORE_INDEX
    return labels


def test_state_dict_keys_and_shapes():
    cfg = ChatGLMConfig(**TINY)
    sd = ChatGLMForConditionalGeneration(cfg).state_dict()
    H, G, D, h, f, V = 4, 2, 16, 32, 64, 256
    expected = {"transformer.embedding.word_embeddings.weight": (V, h),
                "transformer.encoder.final_layernorm.weight": (h,),
                "transformer.output_layer.weight": (V, h)}
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}."
        expected.update({p + "input_layernorm.weight": (h,),
                         p + "self_attention.query_key_value.weight": ((H + 2 * G) * D, h),
                         p + "self_attention.query_key_value.bias": ((H + 2 * G) * D,),
                         p + "self_attention.dense.weight": (h, H * D),
                         p + "post_attention_layernorm.weight": (h,),
                         p + "mlp.dense_h_to_4h.weight": (2 * f, h),
                         p + "mlp.dense_4h_to_h.weight": (h, f)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_release_config_and_full_size_shapes():
    """ChatGLM3-6B's config.json fields (extra release-only fields kept) give the 6.2B layout."""
    release = dict(add_bias_linear=False, add_qkv_bias=True, apply_query_key_layer_scaling=True,
                   apply_residual_connection_post_layernorm=False, attention_dropout=0.0,
                   attention_softmax_in_fp32=True, bias_dropout_fusion=True, ffn_hidden_size=13696,
                   fp32_residual_connection=False, hidden_dropout=0.0, hidden_size=4096, kv_channels=128,
                   layernorm_epsilon=1e-5, multi_query_attention=True, multi_query_group_num=2,
                   num_attention_heads=32, num_layers=28, original_rope=True, padded_vocab_size=65024,
                   post_layer_norm=True, rmsnorm=True, seq_length=8192, torch_dtype="float16",
                   eos_token_id=2, pad_token_id=0, pre_seq_len=None, prefix_projection=False,
                   auto_map={"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"})
    with pytest.raises(ValueError, match="rope_ratio"):  # the release config says no RoPE ratio: never assumed
        ChatGLMForConditionalGeneration(ChatGLMConfig(**release))
    cfg = ChatGLMConfig(**release, rope_ratio=200.0)
    assert cfg.apply_query_key_layer_scaling is True and cfg.num_hidden_layers == 28
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(cfg)
    sd = model.state_dict()
    assert sd["transformer.encoder.layers.0.self_attention.query_key_value.weight"].shape == (4608, 4096)
    assert sd["transformer.encoder.layers.27.mlp.dense_h_to_4h.weight"].shape == (27392, 4096)
    n_params = sum(p.numel() for p in model.parameters())
    assert 6.2e9 < n_params < 6.3e9  # ChatGLM3-6B: 6.24B parameters


def test_rotary_is_glm_interleaved_on_first_half():
    """Pairs (x[2i], x[2i+1]) of the first D/2 dims turn by p * (10000 * rope_ratio)^(-2i / (D/2))."""
    from longalign.modeling.modeling_chatglm import apply_rotary, rope_cos_sin

    D, ratio = 16, 200.0
    x = torch.randn(1, 5, 3, D, dtype=torch.float64)
    pos = torch.arange(5)[None] + 7
    cos, sin = rope_cos_sin(pos, D // 2, 10000.0 * ratio, torch.float64)
    out = apply_rotary(x, cos, sin)
    theta = (10000.0 * ratio) ** (-torch.arange(0, D // 2, 2, dtype=torch.float64) / (D // 2))
    turn = torch.polar(torch.ones(5, D // 4, dtype=torch.float64), pos[0, :, None] * theta)
    expected = torch.view_as_real(torch.view_as_complex(x[..., : D // 2].reshape(1, 5, 3, D // 4, 2))
                                  * turn[None, :, None]).flatten(-2)
    assert torch.allclose(out[..., : D // 2], expected, atol=1e-6)  # fp32 angles, as the release
    assert torch.equal(out[..., D // 2:], x[..., D // 2:])


@pytest.mark.parametrize("mqa", [True, False])
def test_packed_logits_equal_each_sequence_alone(mqa):
    model = tiny_model(multi_query_attention=mqa)
    seqs, ids, cu, pos = random_pack(256)
    with torch.no_grad():
        packed = model(ids, cu_seq_lens_q=cu, position_ids=pos).logits[0]
        derived = model(ids, cu_seq_lens_q=cu).logits[0]  # position ids derived from cu_seq_lens_q
        alone = torch.cat([model(s[None]).logits[0] for s in seqs])
    assert (packed - alone).abs().max().item() <= 1e-5
    assert torch.equal(packed, derived)


def test_changing_one_sequence_leaves_others_bit_identical():
    model = tiny_model()
    _, ids, cu, pos = random_pack(256)
    j = 1
    changed = ids.clone()
    changed[0, cu[j] + 3] = (changed[0, cu[j] + 3] + 1) % 256
    with torch.no_grad():
        a = model(ids, cu_seq_lens_q=cu, position_ids=pos).logits[0]
        b = model(changed, cu_seq_lens_q=cu, position_ids=pos).logits[0]
    others = torch.ones(ids.shape[1], dtype=torch.bool)
    others[cu[j]:cu[j + 1]] = False
    assert torch.equal(a[others], b[others])
    assert not torch.equal(a[~others], b[~others])


def test_weighted_packed_loss_gradients_equal_mean_of_sequence_means():
    """Paper Eq. 2: loss_weights 1/N_k give the mean over sequences of each sequence's mean loss."""
    seqs, ids, cu, pos = random_pack(256)
    labels = [labels_for(s, prompt_len=k + 1) for k, s in enumerate(seqs)]
    n_targets = [int((lab[1:] != IGNORE_INDEX).sum()) for lab in labels]  # targets after the shift
    weights = torch.cat([torch.full((len(s),), 1.0 / n) for s, n in zip(seqs, n_targets)])[None]

    packed_model, ref_model = tiny_model(), tiny_model()
    loss = packed_model(ids, labels=torch.cat(labels)[None], loss_weights=weights,
                        cu_seq_lens_q=cu, position_ids=pos).loss
    loss.backward()
    ref = torch.stack([ref_model(s[None], labels=lab[None]).loss for s, lab in zip(seqs, labels)]).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for (name, p), q in zip(packed_model.named_parameters(), ref_model.parameters()):
        rel = (p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)
        assert rel.item() <= 1e-5, name


def test_save_and_reload_identical(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    sd = load_file(weights)  # add the release's extra rotary buffer: it must be ignored on load
    sd["transformer.rotary_pos_emb.inv_freq"] = torch.ones(4)
    save_file(sd, weights, metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())  # the release's extra fields
    config.update(architectures=["ChatGLMModel"], apply_query_key_layer_scaling=True, torch_dtype="float16",
                  auto_map={"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = ChatGLMForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, trust_remote_code=True).eval()
    assert reloaded.config.rope_ratio == 2.0
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_packed_batch_rejects_attention_mask():
    model = tiny_model()
    _, ids, cu, _ = random_pack(256)
    with pytest.raises(ValueError):
        model(ids, cu_seq_lens_q=cu, attention_mask=torch.ones_like(ids))
    with pytest.raises(ValueError):
        model(ids, cu_seq_lens_q=cu[:-1])  # does not end at T


def test_bf16_packed_close_to_fp32():
    model = tiny_model()
    seqs, ids, cu, pos = random_pack(256)
    with torch.no_grad():
        ref = model(ids, cu_seq_lens_q=cu, position_ids=pos).logits
        low = model.to(torch.bfloat16)(ids, cu_seq_lens_q=cu, position_ids=pos).logits
    assert low.dtype == torch.bfloat16
    assert ((low.float() - ref).norm() / ref.norm()).item() <= 2e-2


def greedy_without_cache(model, ids, steps, eos):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if nxt.item() == eos:
            break
    return ids


def test_kv_cache_generation_matches_full_recompute():
    model = tiny_model()
    prompt = torch.randint(3, 256, (1, 6))
    ref = greedy_without_cache(model, prompt, 10, eos=model.config.eos_token_id)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_left_padded_batched_generation_matches_single_rows():
    model = tiny_model()
    rows = [torch.randint(3, 256, (n,)) for n in (4, 7)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    batched = model.generate(ids, attention_mask=mask, **kwargs)[:, width:]
    for b, r in enumerate(rows):
        single = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **kwargs)
        assert torch.equal(batched[b], single[0, len(r):])


def test_chat_returns_response_and_history(tiny_tokenizer):
    model = tiny_model(padded_vocab_size=512, eos_token_id=tiny_tokenizer.eos_token_id,
                       pad_token_id=tiny_tokenizer.pad_token_id)
    response, history = model.chat(tiny_tokenizer, "What is the key?", history=[], max_new_tokens=5,
                                   do_sample=False)
    assert isinstance(response, str) and history == [("What is the key?", response)]
    response2, history2 = model.chat(tiny_tokenizer, "Again?", history=history, max_new_tokens=3,
                                     temperature=0.7, top_p=0.9)
    assert isinstance(response2, str) and history2 == history + [("Again?", response2)]


def _enable_checkpointing(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


@pytest.mark.integration
def test_gradient_checkpointing_gives_identical_gradients():
    _, ids, cu, pos = random_pack(256)
    labels = ids.clone()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            _enable_checkpointing(model)
        model(ids, labels=labels, cu_seq_lens_q=cu, position_ids=pos).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_unpadded_rows(side):
    model = tiny_model()
    rows = [torch.randint(3, 256, (n,)) for n in (5, 9, 7)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    spans = []
    for b, r in enumerate(rows):
        start = 0 if side == "right" else width - len(r)
        ids[b, start:start + len(r)], mask[b, start:start + len(r)] = r, 1
        spans.append(slice(start, start + len(r)))
    labels = ids.clone()  # padding positions are ignored through attention_mask
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        loss_sum = model(ids, labels=labels, attention_mask=mask, loss_aggregation="sum").loss
        ref_sum = 0.0
        for b, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            assert (logits[b, spans[b]] - alone).abs().max().item() <= 1e-5
            ref_sum += model(r[None], labels=r[None], loss_aggregation="sum").loss
    assert abs(loss_sum.item() - float(ref_sum)) <= 1e-5 * abs(float(ref_sum))
