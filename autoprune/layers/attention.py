"""Multi-head attention as autoprune sees it: whole heads as one prunable group per attention module,
and the attention's own FLOPs.

torch-pruning's dependency graph couples channels *between* layers; the heads of an attention module
live *inside* it, and torchvision computes them in code that assumes one width everywhere (the
projections are called functionally, and the heads are reshaped with the input's width). So autoprune
treats each attention module of a known kind as one opaque layer in the graph (its input and output are
the transformer's residual stream, which stays whole) and offers its heads as a group of their own:
removing heads cuts the query, key and value rows and the output projection's columns of those heads,
and the per-head tables (relative position biases, logit scales), and gives the module a forward that
runs with fewer heads than its width suggests (:class:`PrunedMultiheadAttention` and its kin; they compute
exactly what the original does when no head is removed, which the tests check).

FLOPs of an attention module, for one sample (MACs, the convention of :mod:`autoprune.cost`): its
projections, ``E_in · inner · (T_q + 2 T_kv)`` for query, key and value and ``T_q · inner · E_out`` for
the output, and its two matrix products ``2 · T_q · L · inner`` (``QKᵀ`` and the weighted sum of ``V``),
``inner = heads · head_dim``, ``T_q`` queries, ``T_kv`` keys and values, each query attending ``L``
keys (a window's tokens in Swin and MaxViT, the whole sequence in ViT). :func:`autoprune.cost.count_flops`
counts exactly this with a hook on the module, and :class:`autoprune.space.Space` predicts it per kept head.

Known kinds (:func:`attention_layer`): ``torch.nn.MultiheadAttention`` with packed projections
(torchvision's ViT), torchvision's ``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2`` (Swin,
Swin V2) and ``RelativePositionalMultiHeadAttention`` (MaxViT).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from autoprune.errors import InputError


class AttentionLayer(abc.ABC):
    """How autoprune reads and prunes one kind of multi-head attention module.

    The query, key and value projection is one weight of ``3 · heads · head_dim`` rows, queries first,
    then keys, then values, each head-major (head ``h`` holds rows ``h·head_dim … (h+1)·head_dim`` of
    each third); the output projection reads ``heads · head_dim`` columns in the same order.
    """

    types: tuple[type, ...] = ()

    def applies(self, module: nn.Module) -> bool:
        return isinstance(module, self.types)

    # -- what the module is -------------------------------------------------------------------
    @abc.abstractmethod
    def heads(self, m: nn.Module) -> int: ...

    @abc.abstractmethod
    def head_dim(self, m: nn.Module) -> int: ...

    @abc.abstractmethod
    def qkv(self, m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The query-key-value projection: weight ``(3·inner, E_in)`` and bias."""

    @abc.abstractmethod
    def proj(self, m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output projection: weight ``(E_out, inner)`` and bias."""

    def head_tables(self, m: nn.Module) -> list[tuple[str, int]]:
        """Parameters holding one slice per head: ``(name relative to the module, head dimension)``."""
        return []

    def prunable(self, m: nn.Module) -> bool:
        """Whether its heads can be removed (a configuration this adapter handles)."""
        return True

    def in_features(self, m: nn.Module) -> int:
        return int(self.qkv(m)[0].shape[1])

    def out_features(self, m: nn.Module) -> int:
        return int(self.proj(m)[0].shape[0])

    # -- FLOPs ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def tokens(self, m: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """``(T_q, T_kv, L)`` for one sample of this call's inputs: queries, keys and values, and the
        keys each query attends."""

    def macs(self, m: nn.Module, tokens: tuple[int, int, int]) -> int:
        """Multiply-accumulates of one sample (see the module docstring)."""
        tq, tkv, keys = tokens
        inner = self.heads(m) * self.head_dim(m)
        return int(self.in_features(m) * inner * (tq + 2 * tkv) + tq * inner * self.out_features(m)
                   + 2 * tq * keys * inner)

    # -- tracing and pruning --------------------------------------------------------------------
    @abc.abstractmethod
    def stand_in(self, m: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """What the dependency graph traces instead of the module's forward: an output of the right
        shape computed from the input in one step, so that the graph sees one layer between the residual
        stream's input and output and nothing of the reshapes inside."""

    @abc.abstractmethod
    def _pruned_class(self, m: nn.Module) -> type:
        """The class whose forward runs with fewer heads than the module's width."""

    def head_scores(self, m: nn.Module, p: int) -> torch.Tensor:
        """One score per head: ``Σ|w|^p`` over its query, key and value rows and over its output
        projection columns, the mean of the two layers (as a channel's group magnitude is)."""
        heads, hd = self.heads(m), self.head_dim(m)
        w, _ = self.qkv(m)
        rows = w.detach().float().abs().pow(p).sum(1).view(3, heads, hd).sum((0, 2))
        o, _ = self.proj(m)
        cols = o.detach().float().abs().pow(p).sum(0).view(heads, hd).sum(1)
        return (rows + cols) / 2

    def prune_heads(self, m: nn.Module, removed: Iterable[int]) -> None:
        """Remove heads ``removed`` (indices into the module's current heads) from ``m`` in place."""
        removed = sorted(set(int(h) for h in removed))
        heads, hd = self.heads(m), self.head_dim(m)
        if not removed:
            return
        if removed[0] < 0 or removed[-1] >= heads or len(removed) >= heads:
            raise InputError(f"cannot remove heads {removed} of an attention module with {heads}: at least one "
                             "must stay")
        kept = torch.tensor([h for h in range(heads) if h not in removed])
        per_head = (kept[:, None] * hd + torch.arange(hd)).flatten()  # rows of one third
        inner = heads * hd
        rows = torch.cat([per_head + s * inner for s in range(3)])
        self._set_qkv(m, rows)
        self._set_proj(m, per_head)
        for name, dim in self.head_tables(m):
            owner, attr = _owner(m, name)
            old = getattr(owner, attr)
            new = nn.Parameter(old.detach().index_select(dim, kept.to(old.device)).clone(),
                               requires_grad=old.requires_grad)
            if isinstance(owner, nn.Linear) and attr == "weight":
                owner.out_features = new.shape[0]
            setattr(owner, attr, new)
        self._set_heads(m, len(kept), hd)
        cls = self._pruned_class(m)
        if type(m) is not cls:
            m.__class__ = cls

    @abc.abstractmethod
    def _set_qkv(self, m: nn.Module, rows: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def _set_proj(self, m: nn.Module, cols: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def _set_heads(self, m: nn.Module, heads: int, head_dim: int) -> None: ...


def _owner(m: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (m.get_submodule(path) if path else m), attr


def _rows(p: torch.Tensor | None, idx: torch.Tensor) -> nn.Parameter | None:
    if p is None:
        return None
    return nn.Parameter(p.detach().index_select(0, idx.to(p.device)).clone(), requires_grad=p.requires_grad)


def _cols(p: torch.Tensor, idx: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(p.detach().index_select(1, idx.to(p.device)).clone(), requires_grad=p.requires_grad)


def _linear_rows(layer: nn.Linear, rows: torch.Tensor) -> None:
    layer.weight = _rows(layer.weight, rows)
    if layer.bias is not None:
        layer.bias = _rows(layer.bias, rows)
    layer.out_features = len(rows)


def _linear_cols(layer: nn.Linear, cols: torch.Tensor) -> None:
    layer.weight = _cols(layer.weight, cols)
    layer.in_features = len(cols)


# -- torch.nn.MultiheadAttention (torchvision's ViT) ---------------------------------------------


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` after heads were removed: ``num_heads · head_dim`` is narrower than
    ``embed_dim`` (the residual stream), which PyTorch's own forward does not allow. Same call and
    outputs as the original (masks, ``need_weights``, ``batch_first``)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (L, B, E) from here on, as PyTorch's functional attention has it
        tgt, bsz, _ = query.shape
        src = key.shape[0]
        heads, hd = self.num_heads, self.head_dim
        inner = heads * hd
        w, b = self.in_proj_weight, self.in_proj_bias
        parts = [F.linear(x, w[i * inner:(i + 1) * inner], None if b is None else b[i * inner:(i + 1) * inner])
                 for i, x in enumerate((query, key, value))]
        q, k, v = (t.reshape(t.shape[0], bsz, heads, hd).permute(1, 2, 0, 3) for t in parts)  # B, H, L, hd
        mask = _attention_mask(attn_mask, key_padding_mask, bsz, heads, tgt, src, q.dtype, is_causal)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            weights = attn.mean(1) if average_attn_weights else attn
            out = F.dropout(attn, p=dropout, training=self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.permute(2, 0, 1, 3).reshape(tgt, bsz, inner)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _attention_mask(attn_mask, key_padding_mask, bsz, heads, tgt, src, dtype, is_causal) -> torch.Tensor | None:
    """One additive mask of shape broadcastable to (B, H, L, S) from PyTorch's two masks (a True in a
    boolean mask means "do not attend", as in ``nn.MultiheadAttention``)."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(bsz, heads, tgt, src) if mask.dim() == 3 else mask.view(1, 1, tgt, src)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(bsz, 1, 1, src)
        mask = pad if mask is None else mask + pad
    return mask


class _MultiheadAttention(AttentionLayer):
    types = (nn.MultiheadAttention,)

    def prunable(self, m):
        return m._qkv_same_embed_dim and m.in_proj_weight is not None and m.bias_k is None and not m.add_zero_attn

    def heads(self, m):
        return int(m.num_heads)

    def head_dim(self, m):
        return int(m.head_dim)

    def qkv(self, m):
        if m.in_proj_weight is None:  # separate projections: a (3·inner, E) view for scoring and FLOPs
            return torch.cat([m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]), m.in_proj_bias
        return m.in_proj_weight, m.in_proj_bias

    def proj(self, m):
        return m.out_proj.weight, m.out_proj.bias

    def in_features(self, m):
        return int(m.embed_dim)

    def tokens(self, m, args, kwargs):
        names = ("query", "key", "value")
        query, key = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names[:2]))
        if query.dim() == 2:
            return int(query.shape[0]), int(key.shape[0]), int(key.shape[0])
        seq = 1 if m.batch_first else 0
        return int(query.shape[seq]), int(key.shape[seq]), int(key.shape[seq])

    def stand_in(self, m, *args, **kwargs):
        query = args[0] if args else kwargs["query"]
        return query * 1.0, None

    def _pruned_class(self, m):
        return PrunedMultiheadAttention

    def _set_qkv(self, m, rows):
        m.in_proj_weight = _rows(m.in_proj_weight, rows)
        m.in_proj_bias = _rows(m.in_proj_bias, rows)

    def _set_proj(self, m, cols):
        _linear_cols(m.out_proj, cols)

    def _set_heads(self, m, heads, head_dim):
        m.num_heads, m.head_dim = heads, head_dim


# -- torchvision's Swin (V1 and V2) ---------------------------------------------------------------


def window_attention(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Shifted-window multi-head self-attention (Liu et al., ICCV 2021; V2's cosine attention, CVPR
    2022) of a torchvision ``ShiftedWindowAttention[V2]`` with ``m.num_heads`` heads of
    ``m.head_dim`` each, whatever the width of ``x`` (``[B, H, W, C]``). With no head removed it
    computes what torchvision's ``shifted_window_attention`` does."""
    from torchvision.models.swin_transformer import ShiftedWindowAttentionV2

    v2 = isinstance(m, ShiftedWindowAttentionV2)
    B, H, W, C = x.shape
    wh, ww = m.window_size
    x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
    _, ph, pw, _ = x.shape
    shift = [0 if wh >= ph else m.shift_size[0], 0 if ww >= pw else m.shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw, n = ph // wh, pw // ww, wh * ww
    windows = x.view(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, n, C)
    heads, hd = m.num_heads, getattr(m, "head_dim", None) or C // m.num_heads
    bias = m.qkv.bias
    if v2 and bias is not None:  # V2 has no key bias
        bias = torch.cat([bias[: heads * hd], torch.zeros_like(bias[heads * hd: 2 * heads * hd]),
                          bias[2 * heads * hd:]])
    qkv = F.linear(windows, m.qkv.weight, bias).reshape(len(windows), n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if v2:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(m.logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * hd ** -0.5) @ k.transpose(-2, -1)
    attn = attn + m.get_relative_position_bias()
    if sum(shift) > 0:
        region = x.new_zeros((ph, pw))
        count = 0
        for hs in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
            for ws in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
                region[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        region = region.view(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, n)
        apart = (region.unsqueeze(1) - region.unsqueeze(2)) != 0  # tokens from different regions
        mask = torch.zeros_like(apart, dtype=attn.dtype).masked_fill(apart, -100.0)
        attn = (attn.view(B, nh * nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
    attn = F.dropout(F.softmax(attn, dim=-1), p=m.attention_dropout, training=m.training)
    out = (attn @ v).transpose(1, 2).reshape(len(windows), n, heads * hd)
    out = F.dropout(F.linear(out, m.proj.weight, m.proj.bias), p=m.dropout, training=m.training)
    c_out = out.shape[-1]
    out = out.view(B, nh, nw, wh, ww, c_out).permute(0, 1, 3, 2, 4, 5).reshape(B, ph, pw, c_out)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :H, :W, :].contiguous()


def _swin_classes() -> tuple[type, type, type, type]:
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

    class PrunedShiftedWindowAttention(ShiftedWindowAttention):
        """torchvision's ``ShiftedWindowAttention`` after heads were removed (see :func:`window_attention`)."""

        def forward(self, x):
            return window_attention(self, x)

    class PrunedShiftedWindowAttentionV2(ShiftedWindowAttentionV2):
        """torchvision's ``ShiftedWindowAttentionV2`` after heads were removed (see :func:`window_attention`)."""

        def forward(self, x):
            return window_attention(self, x)

    for cls in (PrunedShiftedWindowAttention, PrunedShiftedWindowAttentionV2):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls  # so that a pruned model pickles (torch.save) and loads again
    return (ShiftedWindowAttention, ShiftedWindowAttentionV2, PrunedShiftedWindowAttention,
            PrunedShiftedWindowAttentionV2)


class _ShiftedWindowAttention(AttentionLayer):
    def __init__(self) -> None:
        self.v1, self.v2, self.pruned_v1, self.pruned_v2 = _swin_classes()
        self.types = (self.v1,)

    def heads(self, m):
        return int(m.num_heads)

    def head_dim(self, m):
        return int(getattr(m, "head_dim", 0) or m.qkv.in_features // m.num_heads)

    def qkv(self, m):
        return m.qkv.weight, m.qkv.bias

    def proj(self, m):
        return m.proj.weight, m.proj.bias

    def head_tables(self, m):
        if isinstance(m, self.v2):
            return [("logit_scale", 0), ("cpb_mlp.2.weight", 0)]
        return [("relative_position_bias_table", 1)]

    def tokens(self, m, args, kwargs):
        x = args[0] if args else kwargs["x"]
        h, w = int(x.shape[1]), int(x.shape[2])
        wh, ww = m.window_size
        padded = math.ceil(h / wh) * wh * math.ceil(w / ww) * ww
        return padded, padded, wh * ww

    def stand_in(self, m, *args, **kwargs):
        return (args[0] if args else kwargs["x"]) * 1.0

    def _pruned_class(self, m):
        return self.pruned_v2 if isinstance(m, self.v2) else self.pruned_v1

    def _set_qkv(self, m, rows):
        _linear_rows(m.qkv, rows)

    def _set_proj(self, m, cols):
        _linear_cols(m.proj, cols)

    def _set_heads(self, m, heads, head_dim):
        m.num_heads, m.head_dim = heads, head_dim


# -- torchvision's MaxViT -------------------------------------------------------------------------


def _maxvit_classes() -> tuple[type, type]:
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

    class PrunedRelativePositionalMultiHeadAttention(RelativePositionalMultiHeadAttention):
        """torchvision's MaxViT attention after heads were removed: the heads are joined back to
        ``n_heads · head_dim`` features, not to the input's width."""

        def forward(self, x):
            B, G, P, _ = x.shape
            heads, hd = self.n_heads, self.head_dim
            q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
            q, k, v = (t.reshape(B, G, P, heads, hd).permute(0, 1, 3, 2, 4) for t in (q, k, v))
            scores = q @ (k * self.scale_factor).transpose(-2, -1) + self.get_relative_positional_bias()
            out = torch.softmax(scores, dim=-1) @ v
            return self.merge(out.permute(0, 1, 3, 2, 4).reshape(B, G, P, heads * hd))

    PrunedRelativePositionalMultiHeadAttention.__module__ = __name__
    PrunedRelativePositionalMultiHeadAttention.__qualname__ = PrunedRelativePositionalMultiHeadAttention.__name__
    globals()["PrunedRelativePositionalMultiHeadAttention"] = PrunedRelativePositionalMultiHeadAttention
    return RelativePositionalMultiHeadAttention, PrunedRelativePositionalMultiHeadAttention


class _RelativePositionalAttention(AttentionLayer):
    def __init__(self) -> None:
        self.base, self.pruned = _maxvit_classes()
        self.types = (self.base,)

    def heads(self, m):
        return int(m.n_heads)

    def head_dim(self, m):
        return int(m.head_dim)

    def qkv(self, m):
        return m.to_qkv.weight, m.to_qkv.bias

    def proj(self, m):
        return m.merge.weight, m.merge.bias

    def head_tables(self, m):
        return [("relative_position_bias_table", 1)]

    def tokens(self, m, args, kwargs):
        x = args[0] if args else kwargs["x"]
        return int(x.shape[1] * x.shape[2]), int(x.shape[1] * x.shape[2]), int(x.shape[2])

    def stand_in(self, m, *args, **kwargs):
        return (args[0] if args else kwargs["x"]) * 1.0

    def _pruned_class(self, m):
        return self.pruned

    def _set_qkv(self, m, rows):
        _linear_rows(m.to_qkv, rows)

    def _set_proj(self, m, cols):
        _linear_cols(m.merge, cols)

    def _set_heads(self, m, heads, head_dim):
        m.n_heads, m.head_dim = heads, head_dim


# -- lookup ---------------------------------------------------------------------------------------

_LAYERS: list[AttentionLayer] | None = None


def attention_layers() -> list[AttentionLayer]:
    """The attention kinds autoprune knows (made once: the torchvision ones import torchvision)."""
    global _LAYERS
    if _LAYERS is None:
        layers: list[AttentionLayer] = [_MultiheadAttention()]
        try:
            layers += [_ShiftedWindowAttention(), _RelativePositionalAttention()]
        except ImportError:  # an old torchvision without Swin or MaxViT
            pass
        _LAYERS = layers
    return _LAYERS


def __getattr__(name: str) -> type:
    # the pruned torchvision classes are made on first use (importing torchvision only then); unpickling a
    # pruned model in a fresh process looks them up here
    if name in ("PrunedShiftedWindowAttention", "PrunedShiftedWindowAttentionV2",
                "PrunedRelativePositionalMultiHeadAttention"):
        attention_layers()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attention_layer(module: nn.Module) -> AttentionLayer | None:
    """The adapter of ``module`` when it is an attention module of a known kind, else None."""
    for layer in attention_layers():
        if layer.applies(module):
            return layer
    return None


class StreamPruner(tp.pruner.BasePruningFunc):
    """The dependency graph's view of an attention module: one layer reading and writing the residual
    stream. autoprune keeps that stream whole (the groups holding it are pinned), so its channels are
    never cut through here."""

    TARGET_MODULES = None

    def __init__(self, layer: AttentionLayer) -> None:
        super().__init__()
        self.layer = layer

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        raise InputError(f"the residual stream of an attention module ({type(layer).__name__}) is kept whole")

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        raise InputError(f"the residual stream of an attention module ({type(layer).__name__}) is kept whole")

    def get_out_channels(self, layer: nn.Module) -> int:
        return self.layer.out_features(layer)

    def get_in_channels(self, layer: nn.Module) -> int:
        return self.layer.in_features(layer)
