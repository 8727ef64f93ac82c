"""A small causal transformer language model over byte tokens, with generation.

``stages(n)`` cuts it into ``n`` sequential pieces for pipeline parallelism (embedding + the first
blocks, …, the last blocks + norm + head): built with the same seed, the pieces hold exactly the
weights of the single model, so pipeline and single-process training can be compared.

Sizes are checked against ``zoo.limits`` before any layer is allocated.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from shared.schemas import ChatTemplate
from zoo import limits

# The chat template the zoo's LMs declare (recorded with each trained version): a plain
# transcript, one "### role" header per message; the assistant's turn ends at the next header.
CHAT_TEMPLATE = ChatTemplate(
    turn="### {role}\n{content}\n",
    generation_prompt="### assistant\n",
    roles=["system", "user", "assistant"],
    stop=["\n### "],
)


def block_parameters(dim: int) -> int:
    """Parameters of one :class:`Block`: attention 4·dim² + 4·dim, MLP 8·dim² + 5·dim, norms 4·dim."""
    return 12 * dim * dim + 13 * dim


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        _check_heads(limits.size("dim", dim), heads)
        limits.parameters("this block", block_parameters(dim))
        dropout = limits.fraction("dropout", dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf"), device=x.device), diagonal=1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Embed(nn.Module):
    def __init__(self, vocab: int, dim: int, context: int) -> None:
        super().__init__()
        sizes = limits.size("vocab", vocab), limits.size("dim", dim), limits.size("context", context)
        limits.parameters("this embedding", (sizes[0] + sizes[2]) * sizes[1])
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.tokens(idx) + self.positions(pos)


class Head(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        limits.parameters("this head", (limits.size("dim", dim) + 1) * limits.size("vocab", vocab) + 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class CausalLM(nn.Module):
    """Token ids (batch, time) → logits (batch, time, vocab)."""

    chat_template: ChatTemplate | None = CHAT_TEMPLATE  # what the trainer registers with a version

    def __init__(
        self,
        vocab: int = 257,
        dim: int = 128,
        layers: int = 4,
        heads: int = 4,
        context: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.context = limits.size("context", context)
        self.vocab = limits.size("vocab", vocab)
        limits.size("layers", layers, high=limits.MAX_LAYERS)
        _check_heads(limits.size("dim", dim), heads)
        embed, head = (vocab + context) * dim, (dim + 1) * vocab + 2 * dim
        limits.parameters("this language model", embed + layers * block_parameters(dim) + head)
        self.embed = Embed(vocab, dim, context)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.head = Head(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def stages(self, n: int) -> list[nn.Module]:
        """The model as ``n`` sequential pieces, sharing these weights."""
        blocks = list(self.blocks)
        if not 1 <= n <= len(blocks):
            raise ValueError(f"cannot cut {len(blocks)} blocks into {n} pipeline stages")
        cuts = [round(i * len(blocks) / n) for i in range(n + 1)]
        pieces: list[nn.Module] = []
        for i in range(n):
            parts: list[nn.Module] = [self.embed] if i == 0 else []
            parts += blocks[cuts[i] : cuts[i + 1]]
            if i == n - 1:
                parts.append(self.head)
            pieces.append(nn.Sequential(*parts))
        return pieces

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield new token ids one at a time (batch of one), sampling with temperature, top-k, top-p;
        temperature 0 is greedy."""
        for _ in range(max_tokens):
            logits = self(idx[:, -self.context :])[:, -1, :]
            if temperature <= 0:
                token = int(logits.argmax(-1))
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1, None]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                if top_p is not None and top_p < 1.0:
                    sorted_p, order = torch.sort(probs, descending=True)
                    keep = torch.cumsum(sorted_p, -1) - sorted_p < top_p
                    keep[..., 0] = True  # the likeliest token always: a top_p that is 0 in float32 keeps it
                    keep[..., 0] = True  # the likeliest stays: a top_p under float32's least (5e-324) kept none
                    sorted_p = sorted_p * keep
                    probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
                    probs = probs / probs.sum(-1, keepdim=True)
                token = int(torch.multinomial(probs, 1, generator=generator))
            yield token
            idx = torch.cat([idx, torch.tensor([[token]], device=idx.device)], dim=1)


def causal_lm(
    *, vocab: int = 257, dim: int = 128, layers: int = 4, heads: int = 4, context: int = 128, dropout: float = 0.0
) -> CausalLM:
    return CausalLM(vocab, dim, layers, heads, context, dropout)


def declared_chat_template(model: nn.Module) -> ChatTemplate | None:
    """The chat template a built model declares (its ``chat_template`` attribute), if any: data
    only, so anything else there is ignored rather than registered."""
    template = getattr(model, "chat_template", None)
    return template if isinstance(template, ChatTemplate) else None


def _check_heads(dim: int, heads: object) -> None:
    if dim % limits.size("heads", heads, high=dim):
        raise ValueError(f"heads ({heads}) must divide dim ({dim})")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
