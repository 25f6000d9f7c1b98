"""A small BERT-style text encoder in plain torch, written to export cleanly to ONNX.

It avoids ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` on purpose: their fused fast
paths trace into ops the legacy ONNX exporter and the edge runtimes handle badly. Attention here is
four ``nn.Linear`` layers (query, key, value, output), heads split by ``reshape``, an additive mask
built from ``attention_mask`` and an explicit softmax, so every weight the compression techniques
look for is an ordinary ``nn.Linear``.

The encoder maps ``input_ids`` and ``attention_mask`` (both int64, shape ``(B, L)``) to one float32
embedding per sequence, ``(B, width)``: the mean of the final hidden states over the real tokens.
Padding never changes an embedding (padded keys get a large negative score, padded positions are
left out of the mean). :class:`MaskedLanguageModel` adds the prediction head used only to train it.

Example:
    >>> import torch
    >>> from edgecompress.compress.models.encoder import TextEncoder
    >>> enc = TextEncoder()
    >>> ids = torch.randint(4, 260, (2, 64))
    >>> enc(ids, torch.ones_like(ids)).shape
    torch.Size([2, 128])
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.nn import functional as F

from edgecompress.compress.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Added to the attention score of padded keys; exp() of it underflows to exactly 0 in float32.
_MASKED_SCORE = -1e9


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit query/key/value/output projections.

    Args:
        width: model width (split evenly across the heads).
        heads: number of attention heads.
        dropout: dropout on the attention probabilities (training only).

    Raises:
        ConfigError: ``width`` is not a multiple of ``heads``.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if heads < 1 or width % heads:
            raise ConfigError(f"width {width} must be a positive multiple of heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` (B, L, D); ``additive_mask`` (B, 1, 1, L) is 0 for real keys."""
        b, n, d = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)) + additive_mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, d)
        return self.out(context)


class EncoderBlock(nn.Module):
    """One transformer block: self-attention then a GELU feed-forward, each with a residual.

    Args:
        width: model width.
        heads: attention heads.
        ffn: hidden width of the feed-forward.
        norm_first: pre-LN (``LayerNorm`` before each sublayer) when true, BERT's post-LN otherwise.
        dropout: dropout after each sublayer and on attention probabilities.
    """

    def __init__(self, width: int, heads: int, ffn: int, norm_first: bool = True, dropout: float = 0.0):
        super().__init__()
        self.norm_first = norm_first
        self.attention = SelfAttention(width, heads, dropout)
        self.norm1 = nn.LayerNorm(width)
        self.feed_forward = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))
        self.norm2 = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self.dropout(self.attention(self.norm1(x), additive_mask))
            return x + self.dropout(self.feed_forward(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.attention(x, additive_mask)))
        return self.norm2(x + self.dropout(self.feed_forward(x)))


class TextEncoder(nn.Module):
    """BERT-style encoder producing one mean-pooled embedding per sequence.

    Args:
        vocab_size: number of token ids (260 for the byte-level tokenizer of ``compress.realdata``).
        max_len: longest sequence the learned position embedding covers.
        width: hidden width (the embedding size).
        layers: number of transformer blocks.
        heads: attention heads per block.
        ffn: hidden width of each feed-forward.
        norm_first: pre-LN blocks plus a final ``LayerNorm`` (default) or post-LN blocks (BERT).
        dropout: dropout rate used in training (0 keeps training deterministic and simple).

    Raises:
        ConfigError: a size is not positive, or ``width`` is not a multiple of ``heads``.
    """

    def __init__(self, vocab_size: int = 260, max_len: int = 64, width: int = 128, layers: int = 4,
                 heads: int = 4, ffn: int = 256, norm_first: bool = True, dropout: float = 0.0):  # fmt: skip
        super().__init__()
        sizes = {"vocab_size": vocab_size, "max_len": max_len, "width": width, "layers": layers, "ffn": ffn}
        bad = {k: v for k, v in sizes.items() if int(v) < 1}
        if bad:
            raise ConfigError(f"text encoder sizes must be positive, got {bad}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.vocab_size, self.max_len, self.width = vocab_size, max_len, width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_len, width)
        self.embedding_norm = nn.LayerNorm(width)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [EncoderBlock(width, heads, ffn, norm_first, dropout) for _ in range(layers)]
        )
        self.final_norm: nn.Module = nn.LayerNorm(width) if norm_first else nn.Identity()
        self.apply(_init_weights)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token hidden states, float32 ``(B, L, width)`` (padded positions hold garbage).

        Args:
            input_ids: int64 ``(B, L)`` token ids, ``L <= max_len``.
            attention_mask: int64 ``(B, L)``, 1 for real tokens and 0 for padding.

        Returns:
            The final hidden states.

        Raises:
            DataError: ``L`` exceeds ``max_len``.
        """
        seq_len = input_ids.shape[1]
        if not torch.jit.is_tracing() and seq_len > self.max_len:
            raise DataError(f"sequence length {seq_len} exceeds the encoder's max_len {self.max_len}")
        x = self.token_embedding(input_ids) + self.position_embedding.weight[:seq_len].unsqueeze(0)
        x = self.embedding_dropout(self.embedding_norm(x))
        keep = attention_mask.to(x.dtype)[:, None, None, :]
        additive_mask = (1.0 - keep) * _MASKED_SCORE
        for block in self.blocks:
            x = block(x, additive_mask)
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled embedding of each sequence.

        Args:
            input_ids: int64 ``(B, L)`` token ids, ``L <= max_len``.
            attention_mask: int64 ``(B, L)``, 1 for real tokens and 0 for padding.

        Returns:
            float32 ``(B, width)``: the mean of the final hidden states over the real tokens.
        """
        hidden = self.hidden_states(input_ids, attention_mask)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        total = (hidden * weights).sum(dim=1)
        return total / weights.sum(dim=1).clamp(min=1.0)


class MaskedLanguageModel(nn.Module):
    """Training-only wrapper: an encoder plus a masked-token prediction head.

    The decoder shares the encoder's token embedding matrix (BERT's weight tying), so the head adds
    only a small transform and a bias; save ``model.encoder``, not this wrapper.

    Args:
        encoder: the :class:`TextEncoder` to train.
    """

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder
        width = encoder.width
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.decoder_bias = nn.Parameter(torch.zeros(encoder.vocab_size))
        self.transform.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for every position, ``(B, L, vocab_size)``."""
        hidden = self.transform(self.encoder.hidden_states(input_ids, attention_mask))
        return F.linear(hidden, self.encoder.token_embedding.weight, self.decoder_bias)


def _init_weights(module: nn.Module) -> None:
    # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm.
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def text_encoder(vocab_size: int = 260, max_len: int = 64, width: int = 128, layers: int = 4, heads: int = 4,
                 ffn: int = 256, norm_first: bool = True, dropout: float = 0.0,
                 num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:  # fmt: skip
    """Build the text encoder (random weights).

    ``num_classes`` and ``in_chans`` are accepted for the registry's uniform call and ignored: the
    encoder has no classifier and reads token ids.

    Args:
        vocab_size: number of token ids.
        max_len: longest sequence.
        width: embedding width.
        layers: transformer blocks.
        heads: attention heads.
        ffn: feed-forward hidden width.
        norm_first: pre-LN (true) or post-LN blocks.
        dropout: training dropout.
        num_classes: ignored.
        in_chans: ignored.

    Returns:
        A :class:`TextEncoder`.

    Raises:
        ConfigError: invalid sizes.
    """
    if num_classes is not None or in_chans is not None:
        log.debug("text-encoder ignores num_classes=%s and in_chans=%s", num_classes, in_chans)
    return TextEncoder(vocab_size, max_len, width, layers, heads, ffn, norm_first, dropout)
