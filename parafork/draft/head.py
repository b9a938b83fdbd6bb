"""An EAGLE-3 draft head for the bundled model: one decoder layer that guesses the next tokens
from the target's own hidden states (arXiv 2503.01840).

**What goes in.** At a target position t (token x_t) the target's residual stream entering
three of its layers (`HeadConfig.aux_layers`: low, middle, high; vLLM's default 2, L/2, L-3)
is concatenated, 3h wide, and `fc` maps it to h: the fused feature f_t. The head's first step
at t reads f_t beside the embedding of the next token x_{t+1} (the target's own embedding
table, not a copy: the head ships without one) and predicts x_{t+2}. Each further step j at t
reads the head's own previous output (pre-norm, as vLLM feeds it back) beside x_{t+j+1} and
predicts x_{t+j+2}, at rotary position t+j.

**Attention.** Step j's query at t sees step 0's keys at positions <= t (the context, keyed
from target features) and its own chain's keys of steps 1..j at t, as a head decoding a chain
does: the context's keys come from the target, the chain's from the head ("training-time
test": training unrolls exactly this, so the head learns to read its own outputs).

**Draft vocabulary.** The tied LM head is 49,152 x 576 (a fifth of the model); the head
projects onto `draft_vocab_size` tokens only, the most frequent in the model's own answers with
the control tokens always in (`d2t[i]` = target id - i, vLLM's layout; `t2d` marks them).

The weights and config.json follow the EAGLE-3 layout vLLM loads (`LlamaForCausalLMEagle3`:
`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`), so `parafork export` can hand them on
as they are.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int  # the target's
    draft_vocab_size: int
    aux_layers: tuple[int, ...]  # target layers whose input residual stream the head reads
    max_position_embeddings: int
    target_digest: str = ""  # the adapter (or model) the head was trained on (draft/store.py)
    card: dict = field(default_factory=dict)  # data, size, acceptance: what the head's card says

    @classmethod
    def for_target(cls, config, vocab_size: int, draft_vocab_size: int, aux_layers: tuple[int, ...] | None = None,
                   **extra) -> HeadConfig:
        """A head shaped like one of `config`'s (a transformers LlamaConfig) decoder layers,
        reading the layers `aux_layers` (default: EAGLE-3's low, middle, high)."""
        layers = config.num_hidden_layers
        rope = getattr(config, "rope_parameters", None) or {}
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                   num_key_value_heads=config.num_key_value_heads, head_dim=head_dim,
                   intermediate_size=config.intermediate_size, rms_norm_eps=config.rms_norm_eps,
                   rope_theta=rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
                   vocab_size=vocab_size, draft_vocab_size=draft_vocab_size,
                   aux_layers=tuple(aux_layers or (2, layers // 2, layers - 3)), max_position_embeddings=config.max_position_embeddings,
                   **extra)

    def to_hf(self) -> dict:
        """config.json as vLLM's EAGLE-3 loader reads it, parafork's own fields beside."""
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.aux_layers), "use_aux_hidden_state": True},
            "parafork": {"target_digest": self.target_digest, "card": self.card},
        }

    @classmethod
    def from_hf(cls, data: dict) -> HeadConfig:
        if data.get("architectures") != ["LlamaForCausalLMEagle3"] or data.get("num_hidden_layers") != 1:
            raise ValueError("not an EAGLE-3 head of one layer (architectures LlamaForCausalLMEagle3)")
        own = data.get("parafork", {})
        return cls(hidden_size=data["hidden_size"], num_attention_heads=data["num_attention_heads"],
                   num_key_value_heads=data["num_key_value_heads"], head_dim=data["head_dim"],
                   intermediate_size=data["intermediate_size"], rms_norm_eps=data["rms_norm_eps"],
                   rope_theta=data["rope_theta"], vocab_size=data["vocab_size"],
                   draft_vocab_size=data["draft_vocab_size"],
                   aux_layers=tuple(data["eagle_config"]["eagle_aux_hidden_state_layer_ids"]),
                   max_position_embeddings=data["max_position_embeddings"],
                   target_digest=own.get("target_digest", ""), card=own.get("card", {}))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama's: halves rotated) of x [..., T, heads, D] at `positions` [..., T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    angles = positions.float()[..., None] * inv  # [..., T, D/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1)[..., None, :], torch.cat([angles.sin()] * 2, -1)[..., None, :]
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: HeadConfig) -> None:
        super().__init__()
        self.c = c
        inp = 2 * c.hidden_size  # [embedding, feature]
        self.q_proj = nn.Linear(inp, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(inp, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(inp, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        c = self.c
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).view(*shape, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).view(*shape, c.num_key_value_heads, c.head_dim)
        return rotate(q, positions, c.rope_theta), rotate(k, positions, c.rope_theta), v


class MLP(nn.Module):
    def __init__(self, c: HeadConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, c: HeadConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)


class EagleHead(nn.Module):
    """The head's weights and its two ways of running: `unroll` (training, every position at
    once, `steps` steps) and `step` (decoding, new positions against a cache of keys)."""

    def __init__(self, c: HeadConfig) -> None:
        super().__init__()
        self.config = c
        self.fc = nn.Linear(len(c.aux_layers) * c.hidden_size, c.hidden_size, bias=False)
        self.midlayer = MidLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))

    def set_vocabulary(self, draft_ids: list[int]) -> None:
        """The target ids the head predicts, in draft order (sorted ascending, as vLLM expects)."""
        ids = sorted(set(draft_ids))
        if len(ids) != self.config.draft_vocab_size or ids[-1] >= self.config.vocab_size or ids[0] < 0:
            raise ValueError(f"a draft vocabulary of {self.config.draft_vocab_size} distinct target ids is needed, "
                             f"got {len(ids)}")
        target = torch.tensor(ids)
        self.d2t.copy_(target - torch.arange(len(ids)))
        self.t2d.zero_()
        self.t2d[target] = True

    @property
    def draft_to_target(self) -> torch.Tensor:
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def _block(self, feature: torch.Tensor, embed: torch.Tensor, attend) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the layer: (normed output for logits, pre-norm output fed to the next step)."""
        m = self.midlayer
        x = torch.cat([m.input_layernorm(embed), m.hidden_norm(feature)], -1)
        h = feature + m.self_attn.o_proj(attend(x))
        h = h + m.mlp(m.post_attention_layernorm(h))
        return self.norm(h), h

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's three hidden states [..., 3h] -> the head's feature [..., h]."""
        return self.fc(aux)

    def unroll(self, aux: torch.Tensor, embeds: torch.Tensor, steps: int, valid: torch.Tensor | None = None
               ) -> list[torch.Tensor]:
        """Training-time test over whole sequences: aux [B, T, 3h] the target's hidden states at
        positions 0..T-1, embeds [B, T + steps - 1, h] the embeddings of tokens 1..T+steps-1
        (x_{t+1} first); `valid` [B, T] marks real positions (keys of padding are never read).
        Returns per step j the head's normed output [B, T, h] at each t, meant to predict
        x_{t+j+2}."""
        c = self.config
        B, T, _ = aux.shape
        positions = torch.arange(T, device=aux.device)
        causal = torch.ones(T, T, dtype=torch.bool, device=aux.device).tril()
        if valid is not None:
            causal = causal & valid[:, None, None, :]  # [B, 1, T, T]
        feature = self.fuse(aux)
        keys, values, outs = [], [], []
        group = c.num_attention_heads // c.num_key_value_heads
        for j in range(steps):
            emb = embeds[:, j:j + T]

            def attend(x, j=j):
                q, k, v = self.midlayer.self_attn.qkv(x, positions + j)  # [B, T, heads, D]
                keys.append(k)
                values.append(v)
                q = q.transpose(1, 2)  # [B, H, T, D]
                # Context keys (step 0, causal) and this position's own chain (steps 1..j).
                k0 = keys[0].transpose(1, 2).repeat_interleave(group, 1)
                v0 = values[0].transpose(1, 2).repeat_interleave(group, 1)
                scores = (q @ k0.transpose(-1, -2)) / math.sqrt(c.head_dim)  # [B, H, T, T]
                scores = scores.masked_fill(~causal, float("-inf"))
                chain = []
                for kk in keys[1:]:
                    kk = kk.transpose(1, 2).repeat_interleave(group, 1)
                    chain.append(((q * kk).sum(-1) / math.sqrt(c.head_dim))[..., None])  # [B, H, T, 1]
                probs = torch.softmax(torch.cat([scores, *chain], -1).float(), -1).to(q.dtype)
                out = probs[..., :T] @ v0
                for i, vv in enumerate(values[1:]):
                    out = out + probs[..., T + i:T + i + 1] * vv.transpose(1, 2).repeat_interleave(group, 1)
                return out.transpose(1, 2).reshape(B, T, -1)

            normed, feature = self._block(feature, emb, attend)
            outs.append(normed)
        return outs

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of normed outputs."""
        return self.lm_head(normed)

    # ---- files ------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in tensors.items()}
        save_file(tensors, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_hf(), indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> EagleHead:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{folder}: no draft head here ({CONFIG_NAME} and {WEIGHTS_NAME} wanted)")
        head = cls(HeadConfig.from_hf(json.loads((folder / CONFIG_NAME).read_text())))
        state = load_file(str(folder / WEIGHTS_NAME))
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not match the head's config (missing {missing}, unexpected {unexpected})")
        return head.to(dtype)
