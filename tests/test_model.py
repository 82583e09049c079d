"""Tests of gptlab.model: shapes, causality, variants, init, the KV cache and the CPU bf16 path."""

import copy
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import model_config
from torch import nn

from gptlab import model as model_module
from gptlab.model import (
    GPT,
    Bigram,
    KVCache,
    apply_rope,
    build_model,
    prepack_linears,
    rope_tables,
    swiglu_hidden_size,
)
from gptlab.params import ModelConfig
from gptlab.published import KEYS_ADDED_LATER, parse_config

VOCAB = 65
BLOCK = 16
VARIANTS = list(
    itertools.product(("learned", "rope"), ("layernorm", "rmsnorm"), ("gelu", "swiglu"))
)
# The modded-nanogpt speedrun's architecture.
SPEEDRUN_MODEL = {"pos": "rope", "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True,
                  "logit_softcap": 15.0, "proj_init": "zero", "tie_weights": False}


def tiny_config(**overrides) -> ModelConfig:
    # GPT-2's tied output layer and random projections unless a test says otherwise: with the
    # default zero projections an untrained block computes nothing a test could check.
    fields = dict(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK,
                  tie_weights=True, proj_init="scaled")
    return model_config(**(fields | overrides))


def tiny_model(seed: int = 0, **overrides) -> GPT | Bigram:
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides))


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, (batch, length), generator=generator)


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [1, 63, 64, 65, 50257])
def test_padded_vocab_size_is_next_multiple_of_64(vocab_size):
    padded = tiny_config(vocab_size=vocab_size).padded_vocab_size
    assert padded % 64 == 0
    assert vocab_size <= padded < vocab_size + 64


@pytest.mark.parametrize("vocab_size", [1, 63, 64, 65, 50257])
def test_pad_vocab_off_keeps_the_true_vocabulary_size(vocab_size):
    assert tiny_config(vocab_size=vocab_size, pad_vocab=False).padded_vocab_size == vocab_size


def test_config_written_before_later_keys_builds_the_model_it_was_written_for(tmp_path):
    # config.json files written before a key existed hold every other field: their weights have
    # padded tables, no query/key norm, no logit cap, so loading them must build exactly that.
    model = model_config(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32,
                         block_size=BLOCK).model_dump(exclude=set(KEYS_ADDED_LATER))
    text = json.dumps({"format": 1, "model": model, "training": {},
                       "tokenizer": {"kind": "char", "vocab_size": VOCAB,
                                     "file": "tokenizer.json"}})
    config = parse_config(text, tmp_path / "config.json").model
    assert config.pad_vocab is True and config.padded_vocab_size == 128
    assert (config.qk_norm, config.logit_softcap, config.proj_init) == (False, None, "scaled")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(n_embd=30, n_head=4), "n_head"),
        (dict(n_embd=36, n_head=4, pos="rope"), "rope"),
        (dict(norm="batchnorm"), "norm"),
        (dict(arch="lstm"), "arch"),
    ],
)
def test_config_rejects_values_that_would_crash_obscurely(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


# --- shapes and the padded vocabulary ---------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt", "bigram"])
def test_forward_shapes(arch):
    model = tiny_model(arch=arch)
    idx = random_tokens(3, BLOCK)
    targets = random_tokens(3, BLOCK, seed=2)
    no_logits, loss = model(idx, targets)
    assert no_logits is None and loss.shape == ()  # training keeps no logits alive
    logits, no_loss = model(idx)
    assert logits.shape == (3, BLOCK, VOCAB)
    assert no_loss is None
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


@pytest.mark.parametrize("arch", ["gpt", "bigram"])
def test_sequence_longer_than_block_size_raises(arch):
    model = tiny_model(arch=arch)
    with pytest.raises(ValueError, match="block_size"):
        model(random_tokens(1, BLOCK + 1))


def test_padding_tokens_are_never_sampled():
    model = tiny_model()
    assert model.config.padded_vocab_size > VOCAB
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = 1e4
    logits, _ = model(random_tokens(4, BLOCK))
    assert logits.shape[-1] == VOCAB
    probs = F.softmax(logits[:, -1], dim=-1)
    samples = torch.multinomial(probs, 1000, replacement=True)
    assert samples.max() < VOCAB


# --- causality and variants -------------------------------------------------------------------


@pytest.mark.parametrize(("pos", "norm", "mlp"), VARIANTS)
def test_future_tokens_do_not_change_past_logits(pos, norm, mlp):
    model = tiny_model(pos=pos, norm=norm, mlp=mlp).eval()
    idx = random_tokens(2, BLOCK)
    logits, _ = model(idx)
    for t in (0, 5, BLOCK - 2):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % VOCAB
        changed_logits, _ = model(changed)
        torch.testing.assert_close(changed_logits[:, : t + 1], logits[:, : t + 1])
        assert not torch.allclose(changed_logits[:, t + 1 :], logits[:, t + 1 :])


def test_bigram_sees_only_the_current_token():
    model = tiny_model(arch="bigram")
    idx = random_tokens(2, BLOCK)
    logits, _ = model(idx)
    torch.testing.assert_close(logits, model.logits_table.weight[idx])


@pytest.mark.parametrize(("pos", "norm", "mlp"), VARIANTS)
def test_every_variant_trains(pos, norm, mlp):
    model = tiny_model(pos=pos, norm=norm, mlp=mlp)
    _, loss = model(random_tokens(2, BLOCK), random_tokens(2, BLOCK, seed=2))
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize(("pos", "norm", "mlp"), VARIANTS)
def test_variants_build_what_they_name(pos, norm, mlp):
    model = tiny_model(pos=pos, norm=norm, mlp=mlp)
    names = [name for name, _ in model.named_parameters()]
    has_pos_table = any(name.startswith("pos_emb") for name in names)
    assert has_pos_table == (pos == "learned")
    assert hasattr(model, "rope_cos") == (pos == "rope")

    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    expected_norm = nn.RMSNorm if norm == "rmsnorm" else nn.LayerNorm
    assert len(norms) == 2 * model.config.n_layer + 1
    assert all(isinstance(m, expected_norm) for m in norms)

    linears = [m for m in model.blocks[0].mlp.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == (3 if mlp == "swiglu" else 2)


def test_rope_buffers_are_not_saved():
    model = tiny_model(pos="rope")
    assert not any("rope" in key for key in model.state_dict())
    assert model.rope_cos.shape == (BLOCK, model.config.head_dim)


def test_rope_scores_depend_only_on_relative_position():
    head_dim, length = 8, 12
    cos, sin = rope_tables(head_dim, length)
    q, k = torch.randn(2, head_dim, generator=torch.Generator().manual_seed(0))

    def score(q_pos: int, k_pos: int) -> torch.Tensor:
        rotated_q = apply_rope(q, cos[q_pos], sin[q_pos])
        rotated_k = apply_rope(k, cos[k_pos], sin[k_pos])
        torch.testing.assert_close(rotated_q.norm(), q.norm())
        return rotated_q @ rotated_k

    torch.testing.assert_close(score(5, 2), score(9, 6))
    torch.testing.assert_close(score(3, 3), q @ k)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_layernorm_bias_follows_bias_flag():
    assert tiny_model(bias=False).final_norm.bias is None
    assert tiny_model(bias=True).final_norm.bias is not None


def gpt2_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU as GPT-2's code computes it (its `gelu`, Hugging Face's `gelu_new`)."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize(("mlp", "matches_gpt2"), [("gelu", False), ("gelu_tanh", True)])
def test_gelu_tanh_is_gpt2s_gelu_and_gelu_stays_exact(mlp, matches_gpt2):
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    activation = tiny_model(mlp=mlp).blocks[0].mlp.activation.double()
    assert torch.allclose(activation(x), gpt2_gelu(x), rtol=0, atol=1e-12) == matches_gpt2
    assert torch.equal(activation(x), F.gelu(x)) != matches_gpt2


def test_relu2_is_relu_squared_in_an_mlp_of_gelus_shape():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    relu2, gelu = tiny_model(mlp="relu2").blocks[0].mlp, tiny_model(mlp="gelu").blocks[0].mlp
    assert torch.equal(relu2.activation(x), torch.where(x > 0, x * x, torch.zeros_like(x)))
    assert ({name: p.shape for name, p in relu2.named_parameters()}
            == {name: p.shape for name, p in gelu.named_parameters()})


def test_swiglu_matches_gelu_mlp_size():
    n_embd = 768
    gelu_params = 2 * 4 * n_embd * n_embd
    swiglu_params = 3 * swiglu_hidden_size(n_embd) * n_embd
    assert swiglu_hidden_size(n_embd) % 64 == 0
    assert abs(swiglu_params - gelu_params) / gelu_params < 0.05


@pytest.mark.parametrize("tie_weights", [True, False])
def test_unpadded_model_has_exactly_vocab_size_rows(tie_weights):
    model = tiny_model(pad_vocab=False, tie_weights=tie_weights)
    assert model.lm_head.weight.shape == (VOCAB, 32)
    assert model.tok_emb.weight.shape == (VOCAB, 32)
    logits, _ = model(random_tokens(2, BLOCK))
    assert logits.shape == (2, BLOCK, VOCAB)
    _, loss = model(random_tokens(2, BLOCK), random_tokens(2, BLOCK, seed=2))
    assert torch.isfinite(loss)


def test_padding_changes_only_the_table_sizes():
    padded, unpadded = tiny_model(seed=3), tiny_model(seed=3, pad_vocab=False)
    extra = (padded.config.padded_vocab_size - VOCAB) * 32  # tied: one table of padding rows
    assert padded.num_params() - unpadded.num_params() == extra
    assert padded.flops_per_token() - unpadded.flops_per_token() == 6 * extra


# --- weights and initialisation ---------------------------------------------------------------


def test_tied_weights_share_storage_and_count_once():
    tied = tiny_model(tie_weights=True)
    untied = tiny_model(tie_weights=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert len(list(untied.parameters())) == len(list(tied.parameters())) + 1
    head_size = tied.config.padded_vocab_size * tied.config.n_embd
    assert untied.num_params() - tied.num_params() == head_size


def test_num_params_and_flops_for_a_known_config():
    model = tiny_model()
    V, T, C, L, H = 128, BLOCK, 32, 2, 2
    per_block = 2 * C + 3 * C * C + C * C + 2 * 4 * C * C  # two norms, qkv, out, MLP
    total = V * C + T * C + L * per_block + C
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - T * C
    assert model.flops_per_token() == 6 * (total - T * C) + 12 * L * H * (C // H) * T

    rope = tiny_model(pos="rope")
    assert rope.num_params() == rope.num_params(non_embedding=False) == total - T * C

    # Frozen weights are left out of the trainable count, the position table either way.
    model.blocks[0].requires_grad_(False)
    assert model.num_params(trainable=True) == total - T * C - per_block

    bigram = tiny_model(arch="bigram")
    assert bigram.num_params() == VOCAB * VOCAB
    assert bigram.flops_per_token() == 6 * VOCAB * VOCAB


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=8, n_embd=128))
    residual_std = 0.02 / math.sqrt(2 * 8)
    for name, param in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            continue
        expected = residual_std if name.endswith(("out_proj.weight", "down_proj.weight")) else 0.02
        assert param.std().item() == pytest.approx(expected, rel=0.1), name


def test_zero_projections_start_every_block_as_the_identity():
    model = tiny_model(proj_init="zero")
    for name, param in model.named_parameters():
        if name.endswith(("out_proj.weight", "down_proj.weight")):
            assert not param.any(), name
    idx = random_tokens(2, BLOCK)
    logits, _ = model(idx)
    without_blocks = model.tok_emb(idx) + model.pos_emb(torch.arange(BLOCK))
    torch.testing.assert_close(logits, model.output_logits(without_blocks))
    # Zero projections still learn: their gradient is their input times the loss's gradient.
    _, loss = model(idx, random_tokens(2, BLOCK, seed=2))
    loss.backward()
    assert model.blocks[0].attn.out_proj.weight.grad.abs().sum() > 0


def scale_queries_and_keys(model: GPT, q_scale: float, k_scale: float) -> None:
    with torch.no_grad():
        for block in model.blocks:
            q_rows, k_rows, _ = block.attn.qkv_proj.weight.chunk(3)
            q_rows.mul_(q_scale)
            k_rows.mul_(k_scale)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_makes_attention_blind_to_the_size_of_queries_and_keys(qk_norm):
    model = tiny_model(qk_norm=qk_norm, pos="rope").eval()
    idx = random_tokens(2, BLOCK)
    with torch.no_grad():
        before, _ = model(idx)
        scale_queries_and_keys(model, 40.0, 0.25)
        after, _ = model(idx)
    assert torch.allclose(after, before, atol=1e-4) == qk_norm


def test_qk_norm_gives_queries_and_keys_unit_rms_per_head():
    attention = tiny_model(qk_norm=True).blocks[0].attn
    q, k = torch.randn(2, 2, 5, 16) * 9, torch.randn(2, 2, 5, 16) / 7
    normed_q, normed_k = attention.position_queries_and_keys(q, k, rope=None)
    for t in (normed_q, normed_k):
        torch.testing.assert_close(t.square().mean(-1), torch.ones(2, 2, 5), atol=1e-4,
                                   rtol=0)
    torch.testing.assert_close(normed_q / normed_q.norm(dim=-1, keepdim=True),
                               q / q.norm(dim=-1, keepdim=True))  # the direction kept


def test_logit_softcap_squashes_the_logits_the_model_would_give():
    capped = tiny_model(logit_softcap=2.0)
    plain = tiny_model()  # the same seed: the same weights
    with torch.no_grad():
        for param in capped.lm_head.parameters():
            param.mul_(8)  # large logits, to be capped
        plain.load_state_dict(capped.state_dict())
        idx = random_tokens(2, BLOCK)
        logits, _ = capped(idx)
        uncapped, _ = plain(idx)
    assert uncapped.abs().max() > 4
    assert logits.abs().max() <= 2.0
    torch.testing.assert_close(logits, 2.0 * torch.tanh(uncapped / 2.0))


@pytest.mark.parametrize("arch", ["gpt", "bigram"])
def test_initial_loss_is_uniform_guess(arch):
    model = tiny_model(arch=arch)
    _, loss = model(random_tokens(8, BLOCK), random_tokens(8, BLOCK, seed=2))
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=0.3)


def test_same_seed_gives_same_model():
    idx = random_tokens(2, BLOCK)
    logits_a, _ = tiny_model(seed=7, pos="rope", mlp="swiglu")(idx)
    logits_b, _ = tiny_model(seed=7, pos="rope", mlp="swiglu")(idx)
    logits_c, _ = tiny_model(seed=8, pos="rope", mlp="swiglu")(idx)
    assert torch.equal(logits_a, logits_b)
    assert not torch.equal(logits_a, logits_c)


# --- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_overfits_one_batch(pos):
    model = tiny_model(pos=pos)
    # Distinct tokens, so every next token is determined by its context and zero loss is reachable.
    data = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[: 3 * (BLOCK + 1)]
    data = data.view(3, BLOCK + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        _, loss = model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_cpu_bf16_autocast_matches_fp32_loss():
    model = tiny_model(pos="rope", norm="rmsnorm", mlp="swiglu")
    idx, targets = random_tokens(4, BLOCK), random_tokens(4, BLOCK, seed=2)
    _, fp32_loss = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16_loss = model(idx, targets)
    bf16_loss.backward()
    assert torch.isfinite(bf16_loss)
    assert bf16_loss.item() == pytest.approx(fp32_loss.item(), abs=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_cpu_autocast_runs_attention_in_fp32(monkeypatch):
    seen_dtypes = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen_dtypes.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(random_tokens(1, BLOCK))
    assert logits.dtype == torch.bfloat16
    assert seen_dtypes == [(torch.float32, torch.float32, torch.float32, False)] * 2


# --- KV cache ---------------------------------------------------------------------------------


def logits_in_chunks(model: GPT | Bigram, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    cache = model.new_cache(idx.size(0))
    pieces, start = [], 0
    for size in chunks:
        logits, _ = model(idx[:, start : start + size], cache=cache)
        pieces.append(logits)
        start += size
        assert cache.length == start
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize(
    "chunks",
    [[1] * BLOCK, [5] + [1] * (BLOCK - 5), [4, 5, 1, 6], [BLOCK]],
    ids=["token-by-token", "prefill-then-tokens", "chunks-on-prefix", "one-prefill"],
)
def test_cached_logits_match_full_sequence(pos, chunks):
    model = tiny_model(pos=pos, n_layer=3, qk_norm=pos == "rope").eval()
    idx = random_tokens(2, BLOCK)
    with torch.no_grad():
        full, _ = model(idx)
        cached = logits_in_chunks(model, idx, chunks)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("changes", [{"pos": "learned"}, {"pos": "rope"}, SPEEDRUN_MODEL],
                         ids=["learned", "rope", "speedrun"])
@pytest.mark.parametrize("arch", ["gpt", "bigram"])
def test_decode_step_gives_forwards_logits_for_each_new_token(changes, arch):
    """The lean path generation takes after the prompt computes what forward() computes."""
    model = tiny_model(arch=arch, n_layer=3, **changes).eval()
    idx = random_tokens(2, BLOCK)
    with torch.no_grad():
        full, _ = model(idx)
        forward_cache, decode_cache = model.new_cache(2), model.new_cache(2)
        model(idx[:, :4], cache=forward_cache)
        model(idx[:, :4], cache=decode_cache)
        for position in range(4, BLOCK):
            expected, _ = model(idx[:, position : position + 1], cache=forward_cache)
            actual = model.decode_step(idx[:, position], decode_cache)
            assert torch.equal(actual, expected[:, -1])  # bit for bit: sampled text is the same
            torch.testing.assert_close(actual, full[:, position], atol=1e-5, rtol=1e-5)
        assert decode_cache.length == BLOCK
        with pytest.raises(ValueError, match="capacity"):
            model.decode_step(idx[:, 0], decode_cache)


@pytest.mark.parametrize("mlp", ["gelu_tanh", "swiglu"])
def test_prepacked_linears_compute_what_the_plain_ones_do(mlp):
    """oneDNN's prepacked products, forward and the decode path, to float32 rounding."""
    model = tiny_model(mlp=mlp, n_layer=2).eval()
    prepacked = copy.deepcopy(model)
    per_block = 2 + (3 if mlp == "swiglu" else 2)  # attention's two, the MLP's
    assert prepack_linears(prepacked) == 2 * per_block
    assert all(type(m) is not nn.Linear for block in prepacked.blocks for m in block.modules())
    # The tied output layer keeps the token table: the plain weights left are the embeddings'.
    assert prepacked.lm_head.weight is prepacked.tok_emb.weight
    idx = random_tokens(2, BLOCK)
    with torch.no_grad():
        torch.testing.assert_close(prepacked(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)
        caches = [m.new_cache(2) for m in (model, prepacked)]
        for m, cache in zip((model, prepacked), caches, strict=True):
            m(idx[:, :4], cache=cache)
        for position in range(4, BLOCK):
            expected = model.decode_step(idx[:, position], caches[0])
            actual = prepacked.decode_step(idx[:, position], caches[1])
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_a_build_whose_prepacked_product_fails_is_found_before_generating(monkeypatch):
    def unsupported(self, linear):
        raise RuntimeError("no oneDNN here")

    model_module.can_prepack.cache_clear()
    monkeypatch.setattr(model_module.PrepackedLinear, "__init__", unsupported)
    try:
        assert model_module.can_prepack() is False
    finally:
        model_module.can_prepack.cache_clear()


def test_bigram_accepts_a_cache():
    model = tiny_model(arch="bigram")
    idx = random_tokens(2, BLOCK)
    with torch.no_grad():
        full, _ = model(idx)
        cached = logits_in_chunks(model, idx, [3, 1, 12])
    torch.testing.assert_close(cached, full)


@pytest.mark.parametrize("arch", ["gpt", "bigram"])
def test_cache_overflow_raises_and_leaves_cache_intact(arch):
    model = tiny_model(arch=arch).eval()
    cache = model.new_cache(1)
    with torch.no_grad():
        model(random_tokens(1, 10), cache=cache)
        with pytest.raises(ValueError, match="capacity"):
            model(random_tokens(1, BLOCK - 9), cache=cache)
    assert cache.length == 10


def test_cache_shape_and_reset():
    model = tiny_model().eval()
    cache = model.new_cache(3)
    assert isinstance(cache, KVCache)
    assert cache.capacity == BLOCK
    assert len(cache.keys) == len(cache.values) == model.config.n_layer
    assert cache.keys[0].shape == (3, 2, BLOCK, 16)
    idx = random_tokens(3, 6)
    with torch.no_grad():
        first, _ = model(idx, cache=cache)
        model(random_tokens(3, 4, seed=5), cache=cache)
        cache.reset()
        assert cache.length == 0
        again, _ = model(idx, cache=cache)
    torch.testing.assert_close(again, first)
