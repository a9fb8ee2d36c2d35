"""A small decoder-only PiMoE transformer language model (in the spirit of nanoGPT's model.py).

Every ``moe_every``-th block has a :class:`PiMoE` feed-forward layer, the others a dense
:class:`SwiGLU`. :meth:`LMConfig.dense_twin` gives the all-dense model with the same active
parameters per token, the peer an MoE model should be compared with.
Shapes: ``B`` batch, ``S`` sequence, ``D`` model width, ``H`` heads, ``V`` vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from pimoe.moe.experts import SwiGLU
from pimoe.moe.layer import PiMoE
from pimoe.moe.stats import RoutingStats

_CONFIG_KEY = "pimoe.LMConfig"


@dataclass
class LMConfig:
    """Model hyperparameters; the defaults are the demo's byte-level model."""

    vocab_size: int = 256  # byte-level
    block_size: int = 128  # longest context
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    moe_every: int = 1  # a PiMoE FFN in every k-th block (blocks k-1, 2k-1, ...); 0 = all dense
    num_experts: int = 8
    top_k: int = 2
    ffn_dim: int = 128  # hidden width of one expert
    shared_experts: int = 0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0  # off: at the demo scale it cost held-out loss (docs/benchmarks.md)
    dense_ffn_dim: int | None = None  # dense blocks' width; None = (top_k + shared_experts) * ffn_dim

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.moe_every < 0:
            raise ValueError(f"moe_every must be >= 0, got {self.moe_every}")
        for name in ("vocab_size", "block_size", "n_layer", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def dense_width(self) -> int:
        """Hidden width of the dense SwiGLU blocks: by default, the active width of an MoE block."""
        return self.dense_ffn_dim or (self.top_k + self.shared_experts) * self.ffn_dim

    def is_moe(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) has a PiMoE feed-forward layer."""
        return self.moe_every > 0 and (layer + 1) % self.moe_every == 0

    def dense_twin(self) -> LMConfig:
        """The all-dense config with the same active parameters per token (router gates aside)."""
        return replace(self, moe_every=0, dense_ffn_dim=self.dense_width)


@dataclass
class LMOutput:
    """``logits [B, S, V]``; ``loss = ce_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss``
    (``loss``/``ce_loss`` are None without targets); ``aux_loss`` and ``z_loss`` are sums over the
    MoE layers (zero for a dense model)."""

    logits: Tensor
    loss: Tensor | None
    ce_loss: Tensor | None
    aux_loss: Tensor
    z_loss: Tensor


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with PyTorch's fused scaled-dot-product attention."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:  # [B, S, D] -> [B, S, D]
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # each [B, S, D]
        q, k, v = (t.view(B, S, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(  # [B, H, S, D/H]
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, S, D)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, config: LMConfig, moe: bool) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.RMSNorm(config.d_model)
        self.ffn: nn.Module = (
            PiMoE(config.d_model, config.num_experts, config.top_k, config.ffn_dim,
                  shared_experts=config.shared_experts)
            if moe else SwiGLU(config.d_model, config.dense_width)
        )
        self.ffn_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:  # [B, S, D] -> [B, S, D]
        x = x + self.attn(self.norm1(x))
        return x + self.ffn_dropout(self.ffn(self.norm2(x)))


class PiMoELM(nn.Module):
    """Decoder-only transformer LM with token + learned position embeddings and a tied head."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, config.is_moe(i)) for i in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) for matrices (experts included), residual outputs scaled by
        ``1/sqrt(2 * n_layer)``; norms stay at 1. MoE and dense models get the same recipe."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    residual = name.endswith(("proj.weight", "down.weight", "w_out"))
                    p.normal_(0.0, residual_std if residual else 0.02)

    @property
    def moe_layers(self) -> list[PiMoE]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, PiMoE)]

    def _check_input(self, idx: Tensor, targets: Tensor | None) -> None:
        if idx.dtype != torch.long:
            raise TypeError(f"idx must be a torch.long tensor of token ids, got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [B, S], got {tuple(idx.shape)}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds block_size={self.config.block_size}"
            )
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}), got "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        if targets is not None and (targets.dtype != torch.long or targets.shape != idx.shape):
            raise ValueError(
                f"targets must be torch.long of shape {tuple(idx.shape)}, got "
                f"{targets.dtype} {tuple(targets.shape)}"
            )

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> LMOutput:
        """``idx [B, S]`` long token ids, optional ``targets [B, S]`` -> :class:`LMOutput`."""
        self._check_input(idx, targets)
        pos = torch.arange(idx.shape[1], device=idx.device)  # [S]
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # [B, S, D]
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm_f(x))  # [B, S, V]
        zero = logits.new_zeros((), dtype=torch.float32)
        aux_loss = sum((layer.aux_loss for layer in self.moe_layers), zero)
        z_loss = sum((layer.z_loss for layer in self.moe_layers), zero)
        if targets is None:
            return LMOutput(logits, None, None, aux_loss, z_loss)
        ce_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss = ce_loss + self.config.aux_loss_coef * aux_loss + self.config.z_loss_coef * z_loss
        return LMOutput(logits, loss, ce_loss, aux_loss, z_loss)

    def routing_stats(self) -> list[RoutingStats]:
        """Per MoE layer, the :class:`RoutingStats` of the last forward call."""
        stats = [layer.last_stats for layer in self.moe_layers]
        if any(s is None for s in stats):
            raise RuntimeError("no routing stats yet: run a forward pass with at least one token")
        return [s for s in stats if s is not None]

    def num_params(self, active: bool = False) -> int:
        """Parameter count (the tied head counted once). ``active=True`` counts what one token
        uses: all parameters except the ``num_experts - top_k`` routed experts it skips in each
        MoE layer. The router gates (``d_model * num_experts`` per MoE layer) are counted as
        active, so an MoE model has exactly that many more active parameters than its dense twin."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for layer in self.moe_layers:
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            total -= expert_params * (layer.num_experts - layer.top_k) // layer.num_experts
        return total

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Extend ``idx [B, S]`` by ``max_new_tokens`` sampled tokens -> ``[B, S + max_new_tokens]``.

        The context is cropped to the last ``block_size`` tokens. ``temperature=0`` is greedy
        decoding; ``top_k`` keeps only the k most likely tokens; ``generator`` makes sampling
        reproducible (it must live on the model's device).
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:]).logits[:, -1, :].float()  # [B, V]
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the weights (tied head stored once) and the config as safetensors metadata,
        atomically: to a temporary file in the same folder, then renamed over ``path``."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            save_model(self, str(tmp), metadata={_CONFIG_KEY: json.dumps(asdict(self.config))})
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> PiMoELM:
        """Rebuild a model written by :meth:`save`; ``ValueError`` if the file is not one."""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
        if _CONFIG_KEY not in metadata:
            raise ValueError(f"{path}: no {_CONFIG_KEY!r} entry in the safetensors metadata")
        try:
            config = LMConfig(**json.loads(metadata[_CONFIG_KEY]))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid {_CONFIG_KEY!r} metadata ({err})") from err
        model = cls(config).to(map_location)
        try:
            load_model(model, str(path), strict=True, device=str(map_location))
        except (SafetensorError, RuntimeError) as err:
            raise ValueError(f"{path}: weights do not match the stored config ({err})") from err
        return model
