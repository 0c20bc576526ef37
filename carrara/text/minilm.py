"""all-MiniLM-L6-v2 without importing transformers: a compact BERT encoder and the `tokenizers` tokenizer.

`import transformers` plus `BertModel.from_pretrained` take seconds, longer than sampling a 64×64 image
(docs/performance.md, cold start); this module loads the same weights (same state-dict keys as transformers'
`BertModel`, pooler included so the weight fingerprint is unchanged) in a fraction of that. Only the behaviour
carrara uses is reproduced, and `tests/test_text.py` checks it against transformers: token ids, masks and
token states (Devlin et al. 2019: post-LayerNorm encoder, exact-erf GELU, learned absolute positions).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from carrara.errors import CarraraError


class FastBertTokenizer:
    """The subset of transformers' BertTokenizerFast that carrara calls, on the `tokenizers` library."""

    transformers_class = "BertTokenizer"  # what loads these files in transformers (an exported diffusers folder)

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self._tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            config = json.loads((self.folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception on bad JSON)
            raise CarraraError(f"cannot load the tokenizer in {self.folder}: {str(e).splitlines()[0]}") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.model_max_length = int(config.get("model_max_length", 512))
        self.pad_token = config.get("pad_token", "[PAD]")
        self.pad_token_id = self._tok.token_to_id(self.pad_token)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __call__(self, text, *, padding: str | bool = False, truncation: bool = False, max_length: int | None = None,
                 return_tensors: str | None = None, verbose: bool = True) -> dict:
        """input_ids and attention_mask as transformers returns them (lists, or (B, L) tensors with "pt")."""
        single = isinstance(text, str)
        if truncation and max_length is not None:  # applied before [CLS]/[SEP] are added, as transformers does
            self._tok.enable_truncation(max_length)
        else:
            self._tok.no_truncation()
        ids = [list(e.ids) for e in self._tok.encode_batch([text] if single else list(text))]
        masks = [[1] * len(i) for i in ids]
        if padding == "max_length" and max_length is not None:
            for i, m in zip(ids, masks):
                m += [0] * (max_length - len(i))
                i += [self.pad_token_id] * (max_length - len(i))
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(masks)}
        return {"input_ids": ids[0] if single else ids, "attention_mask": masks[0] if single else masks}

    def save_pretrained(self, folder: str | Path) -> None:
        """Copy the tokenizer files, with this tokenizer's model_max_length."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
            if (self.folder / name).is_file():
                (folder / name).write_bytes((self.folder / name).read_bytes())
        config = json.loads((self.folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": self.model_max_length}))


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        b, n, d = h.shape

        def split(x: Tensor) -> Tensor:  # (B, L, D) → (B, heads, L, D / heads)
            return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(h)), split(self.key(h)), split(self.value(h)),
                                             attn_mask=bias)  # (B, heads, L, D / heads)
        return out.transpose(1, 2).reshape(b, n, d)


class _DenseNorm(nn.Module):
    """dense → dropout (off) → LayerNorm(x + residual): BERT's `…Output` blocks."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Layer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = _SelfAttention(c.hidden_size, c.num_attention_heads)
        self.attention.output = _DenseNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.output = _DenseNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        a = self.attention.output(self.attention.self(h, bias), h)
        return self.output(F.gelu(self.intermediate.dense(a)), a)


class MiniLM(nn.Module):
    """BERT encoder with transformers' `BertModel` state-dict keys; returns `.last_hidden_state` (B, L, D)."""

    def __init__(self, config: dict):
        super().__init__()
        if config.get("model_type") != "bert" or config.get("hidden_act", "gelu") != "gelu" or \
                config.get("position_embedding_type", "absolute") != "absolute":
            raise CarraraError("carrara's compact MiniLM needs a BERT config with gelu and absolute positions")
        c = self.config = SimpleNamespace(**{"layer_norm_eps": 1e-12, **config})
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.embeddings.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.embeddings.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embeddings.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([_Layer(c) for _ in range(c.num_hidden_layers)])
        self.pooler = nn.Module()  # unused by carrara; kept so every weight of the file has its place
        self.pooler.dense = nn.Linear(c.hidden_size, c.hidden_size)

    @classmethod
    def from_folder(cls, folder: str | Path) -> MiniLM:
        folder = Path(folder)
        try:
            model = cls(json.loads((folder / "config.json").read_text(encoding="utf-8")))
            state = load_file(str(folder / "model.safetensors"))
        except (OSError, ValueError, SafetensorError) as e:
            raise CarraraError(f"cannot load text model from {folder}: {str(e).splitlines()[0]}") from None
        state = {k.removeprefix("bert."): v for k, v in state.items() if not k.endswith("position_ids")}
        own = model.state_dict()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            missing = sorted(set(own) - set(state))
            raise CarraraError(f"{folder}/model.safetensors does not hold this BERT's weights"
                               + (f" (e.g. {missing[0]} is missing)" if missing else ""))
        model.load_state_dict(state)
        return model.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> SimpleNamespace:
        """input_ids (B, L), attention_mask (B, L) 1 = token → SimpleNamespace(last_hidden_state=(B, L, D))."""
        e = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = e.word_embeddings(input_ids) + e.position_embeddings(positions) + e.token_type_embeddings.weight[0]
        h = e.LayerNorm(h)  # (B, L, D)
        bias = None
        if attention_mask is not None:  # additive score bias, as transformers builds it: 0 keep, min float drop
            bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min  # (B, 1, 1, L)
        for layer in self.encoder.layer:
            h = layer(h, bias)
        return SimpleNamespace(last_hidden_state=h)

