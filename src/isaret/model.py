"""The transformer encoder that classifies a sequence of landmark frames."""

from __future__ import annotations

import math

import torch
from torch import nn

from isaret.config import ModelConfig


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal encoding of the frame index, added to the frame embeddings."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]]  # (B, T, D)


class TransformerSignLanguageClassifier(nn.Module):
    """Frame embedding, positional encoding, transformer encoder, masked mean pooling, linear head.

    Padded and invalid frames are excluded by the key padding mask and by the pooling, so
    padding a clip with more masked frames leaves its logits unchanged (up to float rounding).
    """

    def __init__(self, feature_dim: int, num_classes: int, max_seq_len: int, cfg: ModelConfig):
        super().__init__()
        self.motion = cfg.motion_features
        self.embed = nn.Linear(feature_dim * (2 if self.motion else 1), cfg.d_model)
        self.position = PositionalEncoding(cfg.d_model, max_seq_len)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=cfg.d_model, nhead=cfg.nhead, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # enable_nested_tensor=False: the nested-tensor fast path returns zeros at padded positions
        # only in some modes; keeping one code path makes training and inference compute the same.
        self.encoder = nn.TransformerEncoder(layer, num_layers=cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, num_classes)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Return logits (B, classes) for frames x (B, T, F) where valid (B, T) marks real frames."""
        # Attention and pooling give invalid frames weight 0, but 0 * NaN is NaN, so zero them first.
        x = x.masked_fill(~valid.unsqueeze(-1), 0.0)
        if self.motion:
            x = torch.cat([x, frame_differences(x, valid)], dim=-1)  # (B, T, 2F)
        h = self.dropout(self.position(self.embed(x)))  # (B, T, D)
        h = self.encoder(h, src_key_padding_mask=~valid)  # (B, T, D)
        weights = valid.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, D)
        return self.head(self.dropout(self.norm(pooled)))  # (B, classes)


def frame_differences(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Return x[t] - x[t-1] (B, T, F) where frames t and t-1 are both valid, else 0."""
    previous = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # (B, T, F)
    previous_valid = torch.cat([valid[:, :1], valid[:, :-1]], dim=1)  # (B, T)
    both = (valid & previous_valid).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x - previous) * both


def build_model(feature_dim: int, num_classes: int, max_seq_len: int, cfg: ModelConfig) -> nn.Module:
    return TransformerSignLanguageClassifier(feature_dim, num_classes, max_seq_len, cfg)
