"""The Qwen3.5 text decoder: hybrid Gated DeltaNet + gated full attention, over the engine's flat varlen batch.

Read top to bottom in data-flow order: norms, MLP, the DeltaNet mixer, the attention mixer, the decoder layer, the
model, and the causal-LM head with cache allocation. The math follows shared/docs/qwen3_5_arch.md; every kernel-able
step is a call into `fp4serve.ops`, so this file stays plain PyTorch and contains no scheduling.

The forward consumes one `ForwardBatch` (any mix of fresh prompts, prompt chunks after cached context, and decode
tokens) and updates the `ModelCache` in place: new K/V go to the paged cache through `slot_mapping`, and each
sequence's DeltaNet conv and recurrent states continue from (or, where `has_initial_state` is False, restart in)
its slot `state_indices[i]`. Linear layers come from a `make_linear(name, in, out)` factory so the loader decides,
module by module, between `nn.Linear` (BF16) and `NVFP4Linear`; parameter names are the checkpoint's names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fp4serve.engine.batch import ForwardBatch, ModelCache
from fp4serve.model.config import Qwen35TextConfig
from fp4serve.model.embedding import NVFP4Embedding
from fp4serve.ops.activation import silu_and_mul
from fp4serve.ops.attention import paged_attention, store_kv
from fp4serve.ops.conv1d import causal_conv1d, causal_conv1d_update
from fp4serve.ops.gdn import chunk_gated_delta_rule, gated_delta_rule_decode
from fp4serve.ops.norm import gated_rms_norm, l2_norm, rms_norm, rms_norm_residual
from fp4serve.ops.rope import apply_mrope, mrope_cos_sin

# (module name as in a Qwen3_5ForCausalLM checkpoint, in_features, out_features) -> a module computing x @ W^T
LinearFactory = Callable[[str, int, int], nn.Module]


def plain_linear_factory(dtype: torch.dtype, device: torch.device | str | None = None) -> LinearFactory:
    """Every projection a bias-free `nn.Linear` (the BF16 checkpoint case)."""
    return lambda name, in_features, out_features: nn.Linear(
        in_features, out_features, bias=False, dtype=dtype, device=device
    )


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: scales by `1 + weight` (weights stored around zero)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one fused op."""
        return rms_norm_residual(x, residual, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """DeltaNet output norm: plain `weight * norm(x) * silu(z)` per value head."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, config: Qwen35TextConfig, prefix: str, make_linear: LinearFactory) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = make_linear(f"{prefix}.gate_proj", hidden, inter)
        self.up_proj = make_linear(f"{prefix}.up_proj", hidden, inter)
        self.down_proj = make_linear(f"{prefix}.down_proj", inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class GatedDeltaNet(nn.Module):
    """Linear-attention mixer: causal conv + SiLU on [q|k|v], L2-normed q/k, the gated delta rule, gated norm."""

    def __init__(
        self,
        config: Qwen35TextConfig,
        layer_idx: int,
        prefix: str,
        make_linear: LinearFactory,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.k_dim, self.v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        hidden, conv_dim, value_dim = config.hidden_size, config.conv_dim, config.linear_value_dim
        self.in_proj_qkv = make_linear(f"{prefix}.in_proj_qkv", hidden, conv_dim)
        self.in_proj_z = make_linear(f"{prefix}.in_proj_z", hidden, value_dim)
        self.in_proj_b = make_linear(f"{prefix}.in_proj_b", hidden, self.num_v_heads)
        self.in_proj_a = make_linear(f"{prefix}.in_proj_a", hidden, self.num_v_heads)
        # holds the depthwise weight [C, 1, W] under the checkpoint's name; the conv itself runs in ops.conv1d
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, config.linear_conv_kernel_dim, groups=conv_dim, bias=False, dtype=dtype, device=device
        )
        # gate parameters stay float32 whatever the model dtype: the decay is computed in float32
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads, dtype=torch.float32, device=device))
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads, dtype=torch.float32, device=device))
        self.norm = GatedRMSNorm(self.v_dim, config.rms_norm_eps, dtype, device)
        self.out_proj = make_linear(f"{prefix}.out_proj", value_dim, hidden)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: ModelCache) -> torch.Tensor:
        n = x.shape[0]
        mixed = self.in_proj_qkv(x)  # [N, conv_dim]
        z = self.in_proj_z(x).view(n, self.num_v_heads, self.v_dim)
        b, a = self.in_proj_b(x), self.in_proj_a(x)  # [N, HV]
        conv_state, ssm_state = cache.conv[self.layer_idx], cache.ssm[self.layer_idx]
        conv_weight = self.conv1d.weight[:, 0, :]  # [C, W]

        key_dim = self.num_k_heads * self.k_dim
        sizes = [key_dim, key_dim, self.num_v_heads * self.v_dim]
        scale = self.k_dim**-0.5
        if batch.is_decode_only:
            mixed = causal_conv1d_update(mixed, conv_weight, conv_state, batch.state_indices, batch.has_initial_state)
            q, k, v = mixed.split(sizes, dim=-1)
            # L2 norms, gates and the recurrence in one op (one kernel on a GPU)
            o = gated_delta_rule_decode(
                q.view(n, self.num_k_heads, self.k_dim),
                k.view(n, self.num_k_heads, self.k_dim),
                v.view(n, self.num_v_heads, self.v_dim),
                a,
                b,
                self.A_log,
                self.dt_bias,
                ssm_state,
                batch.state_indices,
                batch.has_initial_state,
                scale,
            )  # [N, HV, V]
        else:
            mixed = causal_conv1d(
                mixed,
                conv_weight,
                conv_state,
                batch.cu_seqlens,
                batch.state_indices,
                batch.has_initial_state,
                max_seqlen=batch.max_query_len,
            )
            q, k, v = mixed.split(sizes, dim=-1)
            q = l2_norm(q.reshape(n, self.num_k_heads, self.k_dim))  # [N, HK, K] float32
            k = l2_norm(k.reshape(n, self.num_k_heads, self.k_dim))
            v = v.reshape(n, self.num_v_heads, self.v_dim)
            beta = b.float().sigmoid()  # [N, HV]
            g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # [N, HV], log-decay <= 0
            o = chunk_gated_delta_rule(
                q, k, v, g, beta, ssm_state, batch.cu_seqlens, batch.state_indices, batch.has_initial_state, scale
            )
        o = self.norm(o, z)  # [N, HV, V]
        return self.out_proj(o.reshape(n, self.num_v_heads * self.v_dim))


class GatedAttention(nn.Module):
    """Full attention: per-head interleaved [query | gate] projection, (1+w) q/k norms, partial MRoPE, GQA over the
    paged cache, sigmoid output gate."""

    def __init__(
        self,
        config: Qwen35TextConfig,
        layer_idx: int,
        prefix: str,
        make_linear: LinearFactory,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, q_width, kv_width = (
            config.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        self.q_proj = make_linear(f"{prefix}.q_proj", hidden, 2 * q_width)
        self.k_proj = make_linear(f"{prefix}.k_proj", hidden, kv_width)
        self.v_proj = make_linear(f"{prefix}.v_proj", hidden, kv_width)
        self.o_proj = make_linear(f"{prefix}.o_proj", q_width, hidden)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, cache: ModelCache, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        q, gate = self.q_proj(x).view(n, self.num_heads, 2, self.head_dim).unbind(dim=2)  # each [N, H, D]
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        q, k = apply_mrope(self.q_norm(q), self.k_norm(k), cos, sin)

        kv_cache = cache.kv[self.layer_idx]
        store_kv(k, v, kv_cache, batch.slot_mapping)
        o = paged_attention(
            q, kv_cache, batch.cu_seqlens, batch.seq_lens, batch.block_tables, self.head_dim**-0.5
        )  # [N, H, D]
        o = o * torch.sigmoid(gate)
        return self.o_proj(o.reshape(n, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: `x += mixer(norm(x))`, `x += mlp(norm(x))`.

    `forward_fused` carries the residual stream separately and folds each residual add into the next norm (one
    fused op instead of an add plus a norm); the sums are rounded to the model dtype exactly as the plain adds are,
    so both forms give the same numbers. `forward` is the plain form, for running one layer on its own."""

    def __init__(
        self,
        config: Qwen35TextConfig,
        layer_idx: int,
        make_linear: LinearFactory,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.is_full_attention = config.is_full_attention(layer_idx)
        if self.is_full_attention:
            self.self_attn = GatedAttention(config, layer_idx, f"{prefix}.self_attn", make_linear, dtype, device)
        else:
            self.linear_attn = GatedDeltaNet(config, layer_idx, f"{prefix}.linear_attn", make_linear, dtype, device)
        self.mlp = MLP(config, f"{prefix}.mlp", make_linear)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, cache: ModelCache, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        out, residual = self.forward_fused(x, None, batch, cache, cos, sin)
        return residual + out

    def forward_fused(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        cache: ModelCache,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual stream before it): the layer's output is their sum. `residual` None: x is the
        whole stream (the first layer)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        if self.is_full_attention:
            mixed = self.self_attn(h, batch, cache, cos, sin)
        else:
            mixed = self.linear_attn(h, batch, cache)
        h, residual = self.post_attention_layernorm.add_and_norm(mixed, residual)
        return self.mlp(h), residual


class Qwen35Model(nn.Module):
    """Embedding (with optional multimodal rows spliced in) → decoder layers → final (1+w) norm."""

    def __init__(
        self,
        config: Qwen35TextConfig,
        make_linear: LinearFactory,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, make_linear, dtype, device) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(self, batch: ForwardBatch, cache: ModelCache) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)  # [N, hidden]
        if batch.mm_embeds is not None:
            x = x.index_copy(0, batch.mm_token_rows, batch.mm_embeds.to(x.dtype))
        c = self.config
        # one cos/sin table per step, shared by every attention layer
        cos, sin = mrope_cos_sin(batch.positions, c.rotary_dim, c.rope_theta, c.mrope_section)
        residual = None
        for layer in self.layers:
            x, residual = layer.forward_fused(x, residual, batch, cache, cos, sin)
        # the last add stays separate so the final norm is an ordinary module call (forward hooks see its output)
        return self.norm(x if residual is None else x + residual)


class Qwen35ForCausalLM(nn.Module):
    """The text model plus its (tied or separate) lm_head, and the sizes/allocation of its caches."""

    def __init__(
        self,
        config: Qwen35TextConfig,
        *,
        make_linear: LinearFactory | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        make_linear = make_linear or plain_linear_factory(dtype, device)
        self.model = Qwen35Model(config, make_linear, dtype, device)
        self.lm_head = (
            None if config.tie_word_embeddings else make_linear("lm_head", config.hidden_size, config.vocab_size)
        )

    def forward(self, batch: ForwardBatch, cache: ModelCache) -> torch.Tensor:
        """Hidden states [N, hidden] after the final norm; caches updated in place."""
        return self.model(batch, cache)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, hidden] (the rows whose next token is wanted) → logits [R, vocab] float32."""
        if self.lm_head is None:
            embed = self.model.embed_tokens
            if isinstance(embed, NVFP4Embedding):
                return embed.logits(hidden).float()
            return F.linear(hidden, embed.weight).float()
        return self.lm_head(hidden).float()

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        c = self.config
        num_full = sum(c.is_full_attention(i) for i in range(c.num_hidden_layers))
        return num_full * 2 * c.num_key_value_heads * c.head_dim * dtype.itemsize

    def state_bytes_per_slot(self, dtype: torch.dtype) -> int:
        """Conv state in `dtype` plus float32 recurrent state, summed over the DeltaNet layers."""
        c = self.config
        num_linear = sum(not c.is_full_attention(i) for i in range(c.num_hidden_layers))
        conv = c.conv_dim * (c.linear_conv_kernel_dim - 1) * dtype.itemsize
        ssm = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4
        return num_linear * (conv + ssm)

    def allocate_cache(
        self, num_blocks: int, block_size: int, num_slots: int, device: torch.device | str, dtype: torch.dtype
    ) -> ModelCache:
        c = self.config
        kv: list[torch.Tensor | None] = []
        conv: list[torch.Tensor | None] = []
        ssm: list[torch.Tensor | None] = []
        for i in range(c.num_hidden_layers):
            if c.is_full_attention(i):
                kv.append(
                    torch.zeros(
                        2, num_blocks, block_size, c.num_key_value_heads, c.head_dim, dtype=dtype, device=device
                    )
                )
                conv.append(None)
                ssm.append(None)
            else:
                kv.append(None)
                conv.append(
                    torch.zeros(num_slots, c.conv_dim, c.linear_conv_kernel_dim - 1, dtype=dtype, device=device)
                )
                ssm.append(
                    torch.zeros(
                        num_slots,
                        c.linear_num_value_heads,
                        c.linear_key_head_dim,
                        c.linear_value_head_dim,
                        dtype=torch.float32,
                        device=device,
                    )
                )
        return ModelCache(kv=kv, conv=conv, ssm=ssm, block_size=block_size)
