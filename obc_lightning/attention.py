"""Multi-head attention whose q, k, v projections are ``nn.Linear`` modules, so that they are calibrated,
quantized, fine-tuned and exported like every other Linear.

``nn.MultiheadAttention`` keeps the three input projections in one bare Parameter (``in_proj_weight``,
3·E x E) that it multiplies functionally: no hook sees its input, no module holds it, and it is 3/4 of
the attention's weights. :func:`split_attention_projections` swaps every ``nn.MultiheadAttention`` of a
model for a :class:`ProjectedAttention` that computes the same function from the same values, with
``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` Linears:

    softmax(q kᵀ / √d_head + mask) v   per head,  q = query W_qᵀ + b_q,  k = key W_kᵀ + b_k,  v = value W_vᵀ + b_v

It is an opt-in change of the model's structure (its state_dict keys become ``q_proj.weight``, ...):
make it where the model is built (before the optimizer is created), and make it again on the fresh
model a quantized checkpoint or packed file is loaded into.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectedAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward (same arguments, same outputs) with Linear q, k, v projections.

    Supports what ``nn.MultiheadAttention`` does except ``add_bias_kv`` and ``add_zero_attn``:
    ``batch_first``, unbatched inputs, ``kdim`` / ``vdim``, ``bias=False``, boolean or additive
    ``attn_mask`` ((L, S) or (N·heads, L, S)) and ``key_padding_mask``, ``need_weights`` with
    ``average_attn_weights``, dropout on the attention weights in training. ``need_weights=False``
    runs ``F.scaled_dot_product_attention``.
    """

    # read by nn.TransformerEncoderLayer to decide on its fused fast path, which needs the packed
    # in_proj_weight: these values make it call this module instead (as in training mode)
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"ProjectedAttention: embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)

    @classmethod
    @torch.no_grad()
    def from_attention(cls, mha: nn.MultiheadAttention, name: str = "") -> ProjectedAttention:
        """A copy of ``mha`` (values, device, dtype, train / eval mode) with Linear projections."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                f"split_attention_projections: MultiheadAttention '{name}' uses add_bias_kv / add_zero_attn, "
                "which ProjectedAttention does not implement"
            )
        w = mha.out_proj.weight
        new = cls(
            mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim,
            mha.batch_first, device=w.device, dtype=w.dtype,
        )
        E = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(E)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.split(E) if mha.in_proj_bias is not None else (None,) * 3
        for proj, weight, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            proj.weight.copy_(weight)
            if b is not None:
                proj.bias.copy_(b)
        new.out_proj.load_state_dict(mha.out_proj.state_dict())
        return new.train(mha.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:  # as nn.MultiheadAttention: is_causal is only a hint
            raise RuntimeError("ProjectedAttention: is_causal needs attn_mask (the causal mask itself)")
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, S, H = query.shape[0], query.shape[1], key.shape[1], self.num_heads

        def heads(x: Tensor) -> Tensor:  # (N, T, E) -> (N, H, T, head_dim)
            return x.view(N, x.shape[1], H, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        mask = self._additive_mask(attn_mask, key_padding_mask, N, L, S, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            weights = F.dropout(weights, p) if p > 0 else weights
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _additive_mask(self, attn_mask, key_padding_mask, N, L, S, dtype) -> Tensor | None:
        """attn_mask and key_padding_mask as one additive mask broadcastable to (N, H, L, S): a boolean
        True (position not attended) becomes -inf, a float mask is added as it is."""

        def additive(m: Tensor) -> Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            mask = mask.view(N, self.num_heads, L, S) if mask.dim() == 3 else mask.view(1, 1, L, S)
        if key_padding_mask is not None:
            pad = additive(key_padding_mask).view(N, 1, 1, S)
            mask = pad if mask is None else mask + pad
        return mask


def split_attention_projections(model: nn.Module) -> list[str]:
    """Replace, in place, every ``nn.MultiheadAttention`` of ``model`` by a :class:`ProjectedAttention`
    holding the same values; returns the names replaced.

    Afterwards ``compress_model`` / ``OBCQuantize`` quantize q_proj, k_proj, v_proj and out_proj like any
    Linear. ``nn.TransformerEncoder``'s nested-tensor fast path, which reads the packed weights, is turned
    off (``use_nested_tensor = False``) in the encoders whose layers were changed. Subclasses of
    ``nn.MultiheadAttention`` (their forward may differ) are left as they are.
    """
    names = [n for n, m in model.named_modules() if type(m) is nn.MultiheadAttention]
    if "" in names:
        raise ValueError("split_attention_projections: the model itself is a MultiheadAttention; use "
                         "ProjectedAttention.from_attention(model)")
    replacements = {n: ProjectedAttention.from_attention(model.get_submodule(n), n) for n in names}  # all checked
    for name, new in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(x, ProjectedAttention) for x in m.modules()):
            m.use_nested_tensor = False
    return names
