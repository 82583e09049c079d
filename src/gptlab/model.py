"""GPT language model and a bigram baseline.

A small, readable decoder-only transformer in the style of nanoGPT, with a few switchable
modernisations (rotary positions, RMSNorm, SwiGLU, ReLU², query/key norm, logit soft-capping,
zero-initialised projections) so their effect can be measured one at a time. `build_model` is
the entry point: given a `ModelConfig` (params.yaml's model section plus the vocabulary size)
it returns a `GPT` or, for `arch: bigram`, the smallest possible baseline,
and both share one interface:

    _, loss = model(idx, targets)               # training: the loss alone
    logits, _ = model(idx)                      # scoring
    cache = model.new_cache(batch_size)         # generation with a key/value cache:
    logits, _ = model(idx, cache=cache)         #   the prompt,
    logits = model.decode_step(token, cache)    #   then one token per row at a time

Logits always have exactly `vocab_size` columns: the embedding tables are padded to a multiple
of 64 for speed (unless `pad_vocab` is off), but the padding ids are never scored or sampled.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.params import ModelConfig

# Parameters that write into the residual stream; GPT-2 scales their init by 1/sqrt(2*n_layer)
# so the variance of the stream does not grow with depth.
RESIDUAL_PROJECTIONS = ("attn.out_proj.weight", "mlp.down_proj.weight")
# The base of the rotary angles, as in RoFormer and LLaMA.
ROPE_BASE = 10000.0

class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer per layer.

    Capacity is the model's block_size; when it is full the caller starts a fresh cache from
    the last block_size tokens. Meant for inference (under torch.no_grad).
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        capacity: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_head, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.capacity = capacity
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def ensure_room(self, num_new: int) -> None:
        if self.length + num_new > self.capacity:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {num_new} new tokens exceeds its "
                f"capacity of {self.capacity} (block_size); start a fresh cache from the last "
                f"{self.capacity} tokens"
            )

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new tokens' keys and values; return those of the whole cached sequence."""
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        # A cache made in another dtype than the keys (float32 under autocast, say) is read in
        # theirs; generate() makes it in the compute dtype, so this converts nothing.
        return self.keys[layer][:, :, :end].to(k.dtype), self.values[layer][:, :, :end].to(v.dtype)

    def advance(self, num_new: int) -> None:
        self.length += num_new

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store one new token's keys and values (B, n_head, 1, head_dim) in place at the cache's
        length; return the keys and values of everything cached, that token included."""
        position = self.length
        self.keys[layer][:, :, position : position + 1] = k
        self.values[layer][:, :, position : position + 1] = v
        return self.keys[layer][:, :, : position + 1], self.values[layer][:, :, : position + 1]


def rope_tables(head_dim: int, length: int, base: float = ROPE_BASE) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, (length, head_dim), in the rotate-half layout."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(length).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (i, i + head_dim/2) pair of x (B, n_head, T, head_dim) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated_half * sin).type_as(x)


def cached_attention_mask(start: int, num_new: int, device: torch.device) -> Tensor | None:
    """Boolean mask letting new tokens at positions start.. see the prefix and themselves.

    None when no mask is needed: a single token may attend to everything cached.
    """
    if num_new == 1:
        return None
    # SDPA's is_causal aligns the triangle to the top-left, which is wrong once a prefix is
    # cached, so the general case needs the bottom-right-aligned mask spelled out.
    return torch.ones(num_new, start + num_new, dtype=torch.bool, device=device).tril(start)


def cpu_autocast_active(x: Tensor) -> bool:
    """Whether x is about to be computed in bf16 by CPU autocast.

    CPUs multiply bf16 matrices fast, but several other kernels are slower in bf16 than in fp32
    there (SDPA's backward about 5x, LayerNorm about 2x), so those stay in fp32.
    """
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


class Float32UnderCpuAutocast:
    """Mixin for modules whose forward is faster (and no less accurate) in fp32 on CPU."""

    def forward(self, x: Tensor) -> Tensor:
        if cpu_autocast_active(x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class LayerNorm(Float32UnderCpuAutocast, nn.LayerNorm):
    pass


class RMSNorm(Float32UnderCpuAutocast, nn.RMSNorm):
    pass


def attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float
) -> Tensor:
    """scaled_dot_product_attention, kept in float32 under CPU autocast."""
    if cpu_autocast_active(q):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask, dropout_p, is_causal
            )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.qkv_proj = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def position_queries_and_keys(self, q: Tensor, k: Tensor,
                                  rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Queries and keys (B, n_head, T, head_dim) as attention compares them: normalised
        (qk_norm: their dot products, the attention logits, are then at most head_dim in size,
        however large the weights grow), then rotated (rope)."""
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None
    ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.position_queries_and_keys(q, k, rope)

        if cache is None or cache.length == 0:
            attn_mask, is_causal = None, True
        else:
            attn_mask, is_causal = cached_attention_mask(cache.length, T, x.device), False
        if cache is not None:
            k, v = cache.update(self.layer, k, v)

        dropout_p = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask, is_causal, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.out_proj(y))

    def decode(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache) -> Tensor:
        """forward() for one new token per row, x (B, C): a single token attends to everything
        cached, so there is no mask to build, and (B, 1) needs no transposes.
        """
        B, C = x.shape
        # forward() without nn.Module's __call__: a few microseconds a call, which a small
        # model's generation is bound by.
        qkv = self.qkv_proj.forward(x)
        q, k, v = qkv.view(B, 3, self.n_head, 1, self.head_dim).unbind(1)
        q, k = self.position_queries_and_keys(q, k, rope)
        keys, values = cache.append(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, keys, values)
        return self.out_proj.forward(y.view(B, C))


class PrepackedLinear(nn.Module):
    """An nn.Linear for inference on CPU, its weight prepacked in oneDNN's blocked layout (as
    torch.compile's CPU backend does): GPT-2's shape generates 1.4x faster at batch 1 and 1.9x
    at batch 8 than through MKL's kernels, to 1e-6 (docs/performance.md). The plain weight is
    dropped: a model made of these can generate, not train or be saved."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@functools.cache
def can_prepack() -> bool:
    """Whether this torch build packs and multiplies as PrepackedLinear does: the operators are
    private to torch (torch.compile's), so a build without them, or with other arguments, is
    found here once rather than in the middle of a generation."""
    linear = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    try:
        with torch.no_grad():
            return torch.allclose(PrepackedLinear(linear)(x), linear(x), atol=1e-5)
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def prepack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of the model's blocks by a PrepackedLinear (the tied output
    layer stays); the number replaced."""
    blocks = getattr(model, "blocks", [])
    found = [(parent, name) for block in blocks for parent in block.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    # One at a time, each plain weight freed before the next is packed: the peak memory stays
    # the model's, not twice it.
    for parent, name in found:
        setattr(parent, name, PrepackedLinear(getattr(parent, name)))
    return len(found)


class ReLUSquared(nn.Module):
    """relu(x)^2: the modded-nanogpt speedrun's activation (So et al. 2021, "Primer")."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


def make_activation(mlp: str) -> nn.Module:
    """The 4x-wide MLP's activation. GPT-2 was trained with GELU's tanh approximation: its
    weights need it to match exactly."""
    if mlp == "relu2":
        return ReLUSquared()
    return nn.GELU(approximate="tanh" if mlp == "gelu_tanh" else "none")


class MLP(nn.Module):
    """up 4x, the activation, down: GPT-2's feed-forward block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.activation = make_activation(config.mlp)
        self.down_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down_proj(self.activation(self.up_proj(x))))


def swiglu_hidden_size(n_embd: int) -> int:
    # Three matrices of 8/3 * n_embd hold as many weights as the GELU MLP's two of 4 * n_embd.
    return math.ceil(8 * n_embd / 3 / 64) * 64


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = swiglu_hidden_size(config.n_embd)
        self.gate_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return LayerNorm(config.n_embd, bias=config.bias)


def make_mlp(config: ModelConfig) -> nn.Module:
    return SwiGLU(config) if config.mlp == "swiglu" else MLP(config)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache) -> Tensor:
        x = x + self.attn.decode(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))


def check_length(config: ModelConfig, num_new: int, cache: KVCache | None) -> None:
    if cache is not None:
        cache.ensure_room(num_new)
    elif num_new > config.block_size:
        raise ValueError(
            f"sequence length {num_new} exceeds block_size {config.block_size}; "
            f"feed at most the last {config.block_size} tokens"
        )


def logits_or_loss(logits: Tensor, targets: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The logits, or given targets the loss alone: training has no use for the logits, and
    returning them would keep a (batch, block, vocab) tensor alive through the backward pass
    (6.6 GB for GPT-2 at batch 64 in bf16)."""
    if targets is None:
        return logits, None
    return None, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def count_params(model: nn.Module, leave_out: list[nn.Module | None],
                 trainable: bool = False) -> int:
    """The parameters of `model` that the modules `leave_out` do not hold, a tied weight once;
    trainable leaves out frozen weights too (all but the adapters when LoRA trains)."""
    left_out = {id(p) for module in leave_out if module is not None for p in module.parameters()}
    return sum(p.numel() for p in model.parameters()
               if id(p) not in left_out and (p.requires_grad or not trainable))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.pos_emb = (
            nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        )
        if config.pos == "rope":
            cos, sin = rope_tables(config.head_dim, config.block_size)
            # Derived from the config, so not worth storing in checkpoints.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                if config.proj_init == "zero":
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        T = idx.size(1)
        check_length(self.config, T, cache)
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + T, device=idx.device)

        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        rope = None
        if self.config.pos == "rope":
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.advance(T)
        return logits_or_loss(self.output_logits(x), targets)

    def output_logits(self, x: Tensor) -> Tensor:
        """The next-token logits of the residual stream x (..., n_embd)."""
        # The padded vocabulary rows exist only for matmul speed: drop their logits.
        logits = self.lm_head(self.final_norm(x))[..., : self.config.vocab_size]
        cap = self.config.logit_softcap
        if cap is not None:
            # Smooth, unlike clipping: every logit keeps a gradient.
            logits = cap * torch.tanh(logits / cap)
        return logits

    @torch.inference_mode()
    def decode_step(self, idx: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, vocab_size) of the token after each row's cached prefix and one new token
        idx (B,): what generation runs for every token after the prompt, the same numbers as
        forward() gives for that token, in about half the time."""
        cache.ensure_room(1)
        position = cache.length
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[position]
        rope = None
        if self.config.pos == "rope":
            rope = (self.rope_cos[position], self.rope_sin[position])
        for block in self.blocks:
            x = block.decode(x, rope, cache)
        cache.advance(1)
        return self.output_logits(x)

    def new_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache on the model's device, in its parameter dtype unless given."""
        param = next(self.parameters())
        c = self.config
        return KVCache(
            c.n_layer,
            batch_size,
            c.n_head,
            c.block_size,
            c.head_dim,
            device=param.device,
            dtype=dtype or param.dtype,
        )

    def num_params(self, non_embedding: bool = True, trainable: bool = False) -> int:
        """nanoGPT's count, whose 6N estimates the training FLOPs: non_embedding leaves out the
        position table, a lookup that costs no FLOPs (the token table stays: tied, it is the
        output layer's weight)."""
        return count_params(self, [self.pos_emb] if non_embedding else [], trainable)

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), as in nanoGPT's estimate_mfu."""
        c = self.config
        attention_flops = 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
        return 6 * self.num_params() + attention_flops


class Bigram(nn.Module):
    """Next-token logits looked up from the current token alone: the floor any model must beat.

    Shares GPT's interface so the same code trains, evaluates and samples it; the cache holds
    no keys or values but still tracks length, so callers need no special case.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.logits_table = nn.Embedding(config.vocab_size, config.vocab_size)
        # Small logits make the initial loss ln(vocab_size), like GPT's.
        nn.init.normal_(self.logits_table.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        check_length(self.config, idx.size(1), cache)
        logits = self.logits_table(idx)
        if cache is not None:
            cache.advance(idx.size(1))
        return logits_or_loss(logits, targets)

    @torch.inference_mode()
    def decode_step(self, idx: Tensor, cache: KVCache) -> Tensor:
        cache.ensure_room(1)
        cache.advance(1)
        return self.logits_table(idx)

    def new_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        param = self.logits_table.weight
        c = self.config
        return KVCache(
            0, batch_size, 0, c.block_size, 0, device=param.device, dtype=dtype or param.dtype
        )

    def num_params(self, non_embedding: bool = True, trainable: bool = False) -> int:
        """GPT.num_params's count: there is no position table for non_embedding to leave out,
        and the one table stays, being the output layer (as a tied GPT's token table)."""
        return count_params(self, [], trainable)

    def flops_per_token(self) -> int:
        return 6 * self.num_params()


def build_model(config: ModelConfig) -> GPT | Bigram:
    """The model named by config.arch."""
    return Bigram(config) if config.arch == "bigram" else GPT(config)
