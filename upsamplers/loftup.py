"""LoftUp (Huang et al., ICCV 2025): coordinate/colour Fourier queries at full resolution cross-attending to
low-resolution backbone tokens, with the backbone-side ChannelNorm of the released ``UpsamplerwithChannelNorm``.

Only the "sine" low-resolution positional encoding is implemented (every released checkpoint uses it).
State-dict keys equal the official ones (``upsampler.*``, ``channelnorm.norm.*``), so the Hugging Face
``pytorch_model.bin`` files load strictly.  Lightning training checkpoints (``state_dict`` wrapper, ChannelNorm
stored under ``model.1.norm.*``) are mapped as well.

Notes on numerics: the Fourier features multiply coordinates and colours by frequencies up to e^10, so the float32
order of operations below (true division in the min-max scaler, ``torch.linspace`` coordinates, frequencies from
``exp(linspace)`` in float32, phase = ``signal * freq`` then ``+ bias``) is kept deliberately.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from upbench.checkpoints import PretrainedCfg, WeightSource
from upbench.errors import UpbenchError

from . import register
from .base import Upsampler, as_size, query_chunk, use_device_path
from .layers import LayerNorm2d

_MINMAX_MODES = ("batch", "sample")


# --------------------------------------------------------------------------------------------- building blocks
class ChannelNorm(nn.Module):
    """``nn.LayerNorm(dim)`` over the channel axis at every pixel of a (B, C, H, W) map (key ``norm.*``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MinMaxScaler(nn.Module):
    """Per colour channel: ``(x - min) / (max - min).clamp_min(1e-4) - 0.5``.

    ``mode="batch"`` (the official behaviour) takes min / max over the whole batch and all pixels, so a sample's
    result depends on its batch mates; ``mode="sample"`` takes them per sample.
    """

    def __init__(self, mode: str = "batch"):
        super().__init__()
        if mode not in _MINMAX_MODES:
            raise UpbenchError(f"loftup: minmax must be one of {_MINMAX_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        if self.mode == "batch":
            flat = x.transpose(0, 1).reshape(c, -1)
            lo = flat.min(dim=1).values.reshape(1, c, 1, 1)
            hi = flat.max(dim=1).values.reshape(1, c, 1, 1)
        else:
            flat = x.reshape(b, c, -1)
            lo = flat.min(dim=2).values.reshape(b, c, 1, 1)
            hi = flat.max(dim=2).values.reshape(b, c, 1, 1)
        return (x - lo) / (hi - lo).clamp_min(1e-4) - 0.5

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class ImplicitFeaturizer(nn.Module):
    """Fourier features of pixel coordinates (and optionally colours) with learnable phase biases.

    Signals: [row, col] from ``linspace(-1, 1, H / W)`` ("ij" grid), then the input's channels when
    ``color_feats``.  They are multiplied by ``exp(linspace(-2, 10, n_freqs))`` giving (B, n_freqs, S, H, W),
    flattened to channel ``freq * S + signal``.  Output: cat[sin(phase + b0), cos(phase + b1) (, input)].
    ``biases`` is (2, S, n_freqs); each half is *reshaped* (not transposed) to (1, n_freqs, S, 1, 1).
    """

    def __init__(self, color_feats: bool = True, n_freqs: int = 10, learn_bias: bool = False, in_signals: int = 3):
        super().__init__()
        self.color_feats = color_feats
        self.n_freqs = n_freqs
        self.learn_bias = learn_bias
        self.dim_multiplier = 2 + (in_signals if color_feats else 0)
        if learn_bias:
            self.biases = nn.Parameter(torch.randn(2, self.dim_multiplier, n_freqs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        rows = torch.linspace(-1, 1, h, device=dev, dtype=torch.float32)
        cols = torch.linspace(-1, 1, w, device=dev, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=0).unsqueeze(0).to(x.dtype)
        signals = grid.expand(b, 2, h, w)
        if self.color_feats:
            signals = torch.cat([signals, x], dim=1)
        s = signals.shape[1]
        if s != self.dim_multiplier:
            raise UpbenchError(f"loftup: Fourier featurizer expects {self.dim_multiplier - 2} colour channels, "
                               f"got {s - 2}")
        freqs = torch.exp(torch.linspace(-2, 10, self.n_freqs, device=dev, dtype=torch.float32))
        freqs = freqs.to(x.dtype).reshape(1, self.n_freqs, 1, 1, 1)
        phase = signals.unsqueeze(1) * freqs  # (B, n_freqs, S, H, W)
        if self.learn_bias:
            sin_in = phase + self.biases[0].reshape(1, self.n_freqs, s, 1, 1)
            cos_in = phase + self.biases[1].reshape(1, self.n_freqs, s, 1, 1)
        else:
            sin_in = cos_in = phase
        out = [torch.sin(sin_in).reshape(b, self.n_freqs * s, h, w),
               torch.cos(cos_in).reshape(b, self.n_freqs * s, h, w)]
        if self.color_feats:
            out.append(x)
        return torch.cat(out, dim=1)


class CrossAttention(nn.Module):
    """``q + MHA(LN_q(q), LN_kv(kv), LN_kv(kv))`` with ``nn.MultiheadAttention`` parameters (packed in-proj,
    out-proj, no dropout at inference).  Keys / values are projected once (``project_kv``), queries per chunk."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout)
        self.num_heads = num_heads

    def project_kv(self, kv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) tokens -> keys and values (B, heads, N, head_dim)."""
        att = self.attention
        d = att.embed_dim
        kv = self.norm_kv(kv)
        w, bias = att.in_proj_weight, att.in_proj_bias
        k = F.linear(kv, w[d:2 * d], bias[d:2 * d])
        v = F.linear(kv, w[2 * d:], bias[2 * d:])
        return self._heads(k), self._heads(v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        att = self.attention
        b, n, d = q.shape
        qp = F.linear(self.norm_q(q), att.in_proj_weight[:d], att.in_proj_bias[:d])
        # softmax(q k^T / sqrt(head_dim)) v; the fused kernel avoids materialising the (n, hw) weights per head
        out = F.scaled_dot_product_attention(self._heads(qp), k, v,
                                             dropout_p=att.dropout if self.training else 0.0)
        return q + att.out_proj(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """``q + (LayerNorm -> Linear(D, hidden) -> GELU -> Dropout -> Linear(hidden, D) -> Dropout)(q)``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class CATransformer(nn.Module):
    """Stack of (cross-attention, FFN) layers on the queries, then a final LayerNorm.

    Everything after the key/value projection is per query, so queries may be processed in chunks of
    ``q_chunk_size`` through the whole stack without changing the result.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([CrossAttention(dim, heads, dropout), FeedForward(dim, mlp_dim, dropout)])
            for _ in range(depth)
        )

    def forward(self, q: torch.Tensor, kv: torch.Tensor, q_chunk_size: Optional[int] = None) -> torch.Tensor:
        """``q_chunk_size``: None = automatic (16384 queries on the CPU; on accelerators as many as fit in half
        the free memory, usually all of them); 0 = one piece."""
        kvs = [attn.project_kv(kv) for attn, _ in self.layers]
        n = q.shape[1]
        if q_chunk_size is None:
            # per query: a few (D)-vectors per layer (norms, projections, attention output, FFN hidden) kept live
            per_query = 8 * q.shape[2] * q.element_size() * q.shape[0]
            q_chunk_size = query_chunk(n, per_query, q.device) if use_device_path(q) else 16384
        if not q_chunk_size or q_chunk_size >= n:
            return self._run(q, kvs)
        return torch.cat([self._run(q[:, i:i + q_chunk_size], kvs) for i in range(0, n, q_chunk_size)], dim=1)

    def _run(self, q: torch.Tensor, kvs) -> torch.Tensor:
        for (attn, ffn), (k, v) in zip(self.layers, kvs):
            q = ffn(attn(q, k, v))
        return self.norm(q)


class LoftUpCore(nn.Module):
    """The official ``LoftUp`` module, sine LR positional encoding; called as ``(lr_feats, img)``, features
    already ChannelNormed; returns (B, C, H_img, W_img)."""

    def __init__(self, dim: int, color_feats: bool = True, n_freqs: int = 20, num_heads: int = 4,
                 num_layers: int = 2, num_conv_layers: int = 1, lr_pe_type: str = "sine", lr_size: int = 16,
                 minmax: str = "batch", lr_pe_freqs: int = 5):
        super().__init__()
        if lr_pe_type != "sine":
            raise UpbenchError(f"loftup: only lr_pe_type='sine' is implemented (got {lr_pe_type!r}); "
                               f"every released checkpoint uses it")
        if num_conv_layers != 1:
            raise UpbenchError(f"loftup: only num_conv_layers=1 is implemented (got {num_conv_layers})")
        if not color_feats:
            raise UpbenchError("loftup: only color_feats=True is implemented")
        self.dim = dim
        self.lr_size = lr_size  # only used by the (unimplemented) learnable PE; kept for the constructor signature
        self.lr_pe = ImplicitFeaturizer(color_feats=False, n_freqs=lr_pe_freqs, learn_bias=True)
        pe_dim = 2 * 2 * lr_pe_freqs
        embed = dim + pe_dim
        self.embed_dim = embed
        self.fourier_feat = nn.Sequential(MinMaxScaler(minmax),
                                          ImplicitFeaturizer(color_feats=True, n_freqs=n_freqs, learn_bias=True))
        start = 2 * n_freqs * 5 + 3  # sin + cos of 5 signals, plus the scaled image
        self.first_conv = nn.Sequential(
            ChannelNorm(start),
            nn.Conv2d(start, embed, 3, padding=1), nn.BatchNorm2d(embed), nn.ReLU(),
            nn.Conv2d(embed, embed, 3, padding=1), nn.BatchNorm2d(embed), nn.ReLU(),
        )
        self.final_conv = nn.Sequential(nn.Conv2d(embed, dim, 1), LayerNorm2d(dim, eps=1e-6))
        self.ca_transformer = CATransformer(embed, num_layers, num_heads, dim)

    def forward(self, lr_feats: torch.Tensor, img: torch.Tensor, q_chunk_size: Optional[int] = None) -> torch.Tensor:
        b, _, h_img, w_img = img.shape
        x = self.first_conv(self.fourier_feat(img))  # (B, D, H, W)
        queries = x.flatten(2).transpose(1, 2)  # (B, HW, D)
        pe = self.lr_pe(lr_feats)  # (1 or B, 20, h, w)
        pe = pe.expand(lr_feats.shape[0], -1, -1, -1)
        kv = torch.cat([lr_feats, pe], dim=1).flatten(2).transpose(1, 2)  # (B, hw, D)
        out = self.ca_transformer(queries, kv, q_chunk_size)
        out = out.transpose(1, 2).reshape(b, self.embed_dim, h_img, w_img)
        return self.final_conv(out)


# --------------------------------------------------------------------------------------------- the adapter
PAPER = "https://arxiv.org/abs/2504.14032"


def _hf(repo: str, dim: int, lr_size: int) -> WeightSource:
    return WeightSource(hf_repo=repo, hf_file="pytorch_model.bin", licence="unstated (see andrehuang/loftup)",
                        notes=f"UpsamplerwithChannelNorm(LoftUp({dim}, lr_pe_type='sine', lr_size={lr_size}), "
                              f"ChannelNorm({dim})); in_channels={dim}")


# hub entry -> (C, lr_size, the backbone: a timm name for the DINOv2 family (LoftUp loads it through torch.hub's
# facebookresearch/dinov2 entry, the same weights), else LoftUp's own featurizer name; patch size (None: not stated);
# other names of the backbone)
_ENTRIES = {
    "loftup_dinov2s": (384, 16, "vit_small_patch14_dinov2.lvd142m", 14, ("dinov2_s14", "dinov2_vits14")),
    "loftup_dinov2s_reg": (384, 16, "vit_small_patch14_reg4_dinov2.lvd142m", 14, ("dinov2_vits14_reg",)),
    "loftup_dinov2b": (768, 14, "vit_base_patch14_dinov2.lvd142m", 14, ("dinov2_vitb14",)),
    "loftup_dinov2b_reg": (768, 14, "vit_base_patch14_reg4_dinov2.lvd142m", 14, ("dinov2_vitb14_reg",)),
    "loftup_clip": (512, 14, "clip", None, ()),
    "loftup_siglip": (768, 14, "siglip", None, ()),
    "loftup_siglip2": (768, 14, "siglip2", None, ()),
}


@register("loftup")
class LoftUp(Upsampler):
    """LoftUp with the backbone-side ChannelNorm (``UpsamplerwithChannelNorm``).

    ``forward(image, features, output_size)``: the guidance image is resized (bilinear, align_corners=False) to
    ``output_size`` when it differs, then the official ``(features, image)`` call runs; the result has exactly
    ``output_size``.  ``minmax="batch"`` (default, official) scales colours with batch-wide statistics;
    ``minmax="sample"`` makes every sample independent of its batch mates.  ``q_chunk_size`` bounds the memory of
    the global cross-attention (queries are processed in chunks; the result does not change); ``None`` (default)
    sizes the chunks automatically (16384 queries on the CPU, by free memory on accelerators), 0 means one piece.
    """

    family = "cross-attention"

    official_methods = ("LoftUp",)
    pretrained_cfgs: Dict[str, PretrainedCfg] = {
        name: PretrainedCfg(name, backbone, c, patch, _hf("haiwen/" + name.replace("_", "-", 1), c, lr),
                            PAPER, kwargs={"lr_size": lr}, backbone_aliases=aliases)
        for name, (c, lr, backbone, patch, aliases) in _ENTRIES.items()
    }
    pretrained_sources: Dict[str, WeightSource] = {name: cfg.source for name, cfg in pretrained_cfgs.items()}
    checkpoint_prefixes = ("module.",)
    checkpoint_strict = True

    def __init__(self, in_channels: int = 384, patch_size: Optional[int] = 14, n_freqs: int = 20,
                 num_heads: int = 4, num_layers: int = 2, lr_pe_type: str = "sine", lr_size: int = 16,
                 minmax: str = "batch", q_chunk_size: Optional[int] = None, color_feats: bool = True,
                 num_conv_layers: int = 1, resize_mode: str = "bilinear"):
        super().__init__()
        self.in_channels = int(in_channels)
        if (self.in_channels + 20) % num_heads:
            raise UpbenchError(f"loftup: in_channels + 20 (the tokens carry 20 positional channels) must be a multiple "
                               f"of num_heads={num_heads}; got in_channels={self.in_channels}")
        self.patch_size = patch_size
        self.q_chunk_size = q_chunk_size
        self.resize_mode = resize_mode
        self.upsampler = LoftUpCore(self.in_channels, color_feats=color_feats, n_freqs=n_freqs,
                                    num_heads=num_heads, num_layers=num_layers, num_conv_layers=num_conv_layers,
                                    lr_pe_type=lr_pe_type, lr_size=lr_size, minmax=minmax)
        self.channelnorm = ChannelNorm(self.in_channels)

    @property
    def minmax(self) -> str:
        return self.upsampler.fourier_feat[0].mode

    @minmax.setter
    def minmax(self, mode: str) -> None:
        self.upsampler.fourier_feat[0] = MinMaxScaler(mode)

    # ----------------------------------------------------------------- the official call
    def official_forward(self, lr_feats: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """``UpsamplerwithChannelNorm.forward(lr_feats, img)``: output has the image size."""
        if lr_feats.shape[1] != self.in_channels:
            raise UpbenchError(f"loftup: built for {self.in_channels} feature channels, got {lr_feats.shape[1]}")
        if lr_feats.shape[0] != img.shape[0]:
            raise UpbenchError(f"loftup: batch of features ({lr_feats.shape[0]}) != batch of images ({img.shape[0]})")
        return self.upsampler(self.channelnorm(lr_feats), img, self.q_chunk_size)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        size = tuple(image.shape[-2:]) if output_size is None else as_size(output_size)
        if tuple(image.shape[-2:]) != size:
            kwargs = {"align_corners": False} if self.resize_mode in ("bilinear", "bicubic") else {}
            image = F.interpolate(image, size=size, mode=self.resize_mode, **kwargs)
        return self.official_forward(features, image)

    # ----------------------------------------------------------------- official weights
    def convert_official_state_dict(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Hub files are already in our layout.  Lightning training checkpoints keep the ChannelNorm under
        ``model.1.norm.*`` next to unrelated modules; keep ``upsampler.*`` and map ``model.1.norm.*``."""
        if any(k.startswith("channelnorm.") for k in sd) or not any(k.startswith("model.1.norm.") for k in sd):
            return dict(sd)
        out: Dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            if k.startswith("upsampler."):
                out[k] = v
            elif k.startswith("model.1.norm."):
                out["channelnorm.norm." + k[len("model.1.norm."):]] = v
        return out

    # ----------------------------------------------------------------- golden data
    @classmethod
    def from_official(cls, method: str, constructor: Mapping[str, Any]) -> "LoftUp":
        if method not in cls.official_methods:
            raise UpbenchError(f"loftup cannot build official '{method}' modules")
        args = dict(constructor.get("LoftUp", {}))
        dim = int(args.pop("dim", constructor.get("dim", 384)))
        cn = constructor.get("ChannelNorm", {}) or {}
        if int(cn.get("dim", dim)) != dim:
            raise UpbenchError(f"loftup: ChannelNorm dim {cn.get('dim')} != LoftUp dim {dim}")
        known = {"color_feats", "n_freqs", "num_heads", "num_layers", "num_conv_layers", "lr_size", "lr_pe_type"}
        kwargs = {k: v for k, v in args.items() if k in known}
        # the official module runs the attention in one piece
        return cls(in_channels=dim, q_chunk_size=0, **kwargs)

    def run_official(self, method: str, inputs: Mapping[str, Any], constructor: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        return {"output": self.official_forward(inputs["features"], inputs["image"])}
