"""Real model code for tests: Hugging Face models built from small configs (random weights, no
downloads), with trained-looking normalization statistics."""

from __future__ import annotations

import functools

import torch
from torch import nn


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer random γ/β and (for BN) random running statistics.

    Default-initialised BN (mean 0, var 1, γ 1, β 0) makes folding nearly an identity and hides
    bugs, so every test model goes through this."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.05)
            w = getattr(m, "weight", None)
            b = getattr(m, "bias", None)
            is_norm = isinstance(
                m,
                nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm | nn.RMSNorm
                | nn.modules.instancenorm._InstanceNorm,
            ) or "norm" in type(m).__name__.lower()
            if is_norm and isinstance(w, torch.Tensor) and w.dim() >= 1:
                w.copy_(torch.randn(w.shape, generator=g) * 0.5 + 1.0)
            if is_norm and isinstance(b, torch.Tensor) and b.dim() >= 1:
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
    return model


@functools.cache
def _transformers():
    import transformers

    return transformers


def resnet(depths=(1, 1, 1, 1), hidden=(16, 32, 64, 128), layer_type="bottleneck", seed=0) -> nn.Module:
    """HF ResNetModel; ``resnet50()`` gives the real ResNet-50 architecture."""
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.ResNetConfig(embedding_size=hidden[0], hidden_sizes=list(hidden), depths=list(depths),
                         layer_type=layer_type)
    return randomize_norms(t.ResNetModel(cfg), seed).eval()


def resnet50(seed=0) -> nn.Module:
    t = _transformers()
    torch.manual_seed(seed)
    return randomize_norms(t.ResNetModel(t.ResNetConfig()), seed).eval()


def bert(layers=2, hidden=32, heads=2, seed=0) -> nn.Module:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=hidden * 2,
                       max_position_embeddings=64)
    return randomize_norms(t.BertModel(cfg), seed).eval()


def gpt2(layers=2, hidden=32, heads=2, seed=0) -> nn.Module:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.GPT2Config(vocab_size=100, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                       use_cache=False, bos_token_id=0, eos_token_id=0)
    return randomize_norms(t.GPT2Model(cfg), seed).eval()


def llama(layers=2, hidden=32, heads=2, seed=0) -> nn.Module:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.LlamaConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=heads,
                        intermediate_size=hidden * 2, max_position_embeddings=64, use_cache=False)
    return randomize_norms(t.LlamaModel(cfg), seed).eval()


def vit(layers=2, hidden=32, heads=2, image=32, patch=8, seed=0) -> nn.Module:
    t = _transformers()
    torch.manual_seed(seed)
    cfg = t.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=hidden * 2, image_size=image, patch_size=patch)
    return randomize_norms(t.ViTModel(cfg), seed).eval()


def token_ids(batch=1, seq=16, vocab=100, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def pixels(batch=1, channels=3, size=32, seed=0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
