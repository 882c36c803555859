"""ln-to-rmsnorm coverage over Pre-LN transformers architectures built from small configs.

For each model: trace with torch.export, run ``ln-to-rmsnorm``, compare against an fp64 run of the
original, and record norms total / converted / refused (with reasons) / wrong (verification
failure: a rewrite that changed the outputs). Writes bench/results/ln_to_rmsnorm_coverage.json.

    PYTHONPATH=. python bench/ln_to_rmsnorm_coverage.py [name ...]
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normrewrite.analysis.norms import find_norms
from normrewrite.core.pass_infra import PassContext
from normrewrite.passes.ln_to_rmsnorm import LnToRmsNorm
from normrewrite.trace import trace
from normrewrite.verify import compare, tensor_leaves

OUT = Path(__file__).parent / "results" / "ln_to_rmsnorm_coverage.json"
TOL = 1e-4

TEXT: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    use_cache=False,
)


def _text(cfg_name: str, model_name: str | None = None, **kw: Any) -> Callable[[], tuple]:
    def build() -> tuple[nn.Module, tuple]:
        import transformers as t

        cfg = getattr(t, cfg_name)(**{**TEXT, **kw})
        cls = getattr(t, model_name or cfg_name.replace("Config", "Model"))
        return cls(cfg), (
            torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0)),
        )

    return build


def _vision(cfg_name: str, model_name: str | None = None, size: int = 32, **kw: Any) -> Callable:
    def build() -> tuple[nn.Module, tuple]:
        import transformers as t

        base = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=size,
            patch_size=8,
        )
        cfg = getattr(t, cfg_name)(**{**base, **kw})
        cls = getattr(t, model_name or cfg_name.replace("Config", "Model"))
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        return cls(cfg), (x,)

    return build


def _audio(cfg_name: str, model_name: str, **kw: Any) -> Callable:
    def build() -> tuple[nn.Module, tuple]:
        import transformers as t

        cfg = getattr(t, cfg_name)(**kw)
        x = torch.randn(1, 1600, generator=torch.Generator().manual_seed(0))
        return getattr(t, model_name)(cfg), (x,)

    return build


def _whisper() -> tuple[nn.Module, tuple]:
    import transformers as t

    cfg = t.WhisperConfig(
        vocab_size=96,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=16,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    x = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
    return t.WhisperModel(cfg).get_encoder(), (x,)


def _clip(part: str) -> Callable:
    def build() -> tuple[nn.Module, tuple]:
        import transformers as t

        if part == "text":
            cfg = t.CLIPTextConfig(
                vocab_size=96,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=16,
            )
            ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
            return t.CLIPTextModel(cfg), (ids,)
        cfg = t.CLIPVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return t.CLIPVisionModel(cfg), (x,)

    return build


def _vit_mae() -> tuple[nn.Module, tuple]:
    """ViT-MAE with its masking noise passed in, so the reference and the rewrite agree."""
    model, (x,) = _vision("ViTMAEConfig", mask_ratio=0.0)()
    return model, (x, torch.rand(1, 16, generator=torch.Generator().manual_seed(1)))


def _opt(**kw: Any) -> Callable:
    return _text("OPTConfig", ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=True, **kw)


# wav2vec2-family encoders in their stable-layer-norm (Pre-LN) form, tiny
_STABLE_LN_AUDIO = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    do_stable_layer_norm=True,
    feat_extract_norm="layer",
    conv_dim=(16, 16),
    conv_stride=(5, 4),
    conv_kernel=(10, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
)


ARCHS: dict[str, Callable[[], tuple]] = {
    "gpt2": _text("GPT2Config", n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "gpt_neo": _text(
        "GPTNeoConfig",
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        max_position_embeddings=64,
    ),
    "gptj": _text("GPTJConfig", n_embd=32, n_layer=2, n_head=2, n_positions=64, rotary_dim=8),
    "gpt_neox": _text("GPTNeoXConfig"),
    "gpt_neox_seq": _text("GPTNeoXConfig", use_parallel_residual=False),
    "opt": _opt(),
    "bloom": _text("BloomConfig", n_layer=2, n_head=2),
    "falcon": _text("FalconConfig", new_decoder_architecture=False, parallel_attn=True),
    "falcon_new": _text("FalconConfig", new_decoder_architecture=True, num_kv_heads=2),
    "phi": _text("PhiConfig"),
    "codegen": _text("CodeGenConfig", n_embd=32, n_layer=2, n_head=2, n_positions=64, rotary_dim=8),
    "xglm": _text("XGLMConfig", d_model=32, num_layers=2, attention_heads=2, ffn_dim=64),
    "biogpt": _text("BioGptConfig"),
    "persimmon": _text("PersimmonConfig"),
    "stablelm": _text("StableLmConfig", num_key_value_heads=2),
    "nemotron": _text("NemotronConfig", head_dim=16, num_key_value_heads=2),
    "mpt": _text("MptConfig", d_model=32, n_heads=2, n_layers=2, expansion_ratio=2),
    "gpt_bigcode": _text("GPTBigCodeConfig", n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "imagegpt": _text("ImageGPTConfig", n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "starcoder2": _text("Starcoder2Config", num_key_value_heads=2),
    "olmo": _text("OlmoConfig"),
    "cohere": _text("CohereConfig", num_key_value_heads=2),
    "mbart_enc": _text(
        "MBartConfig",
        "MBartModel",
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    ),
    "xlm_roberta_xl": _text("XLMRobertaXLConfig"),
    "electra_preln": _text("RoFormerConfig"),
    "vit": _vision("ViTConfig"),
    "deit": _vision("DeiTConfig"),
    "beit": _vision("BeitConfig", use_mask_token=False),
    "data2vec_vision": _vision("Data2VecVisionConfig"),
    "dinov2": _vision("Dinov2Config", mlp_ratio=2),
    "dinov2_swiglu": _vision("Dinov2Config", mlp_ratio=2, use_swiglu_ffn=True),
    "vit_msn": _vision("ViTMSNConfig"),
    "vit_mae": _vit_mae,
    "swin": _vision(
        "SwinConfig",
        embed_dim=16,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        patch_size=4,
        window_size=4,
    ),
    "donut_swin": _vision(
        "DonutSwinConfig",
        embed_dim=16,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        patch_size=4,
        window_size=4,
    ),
    "clip_text": _clip("text"),
    "clip_vision": _clip("vision"),
    "siglip_vision": _vision("SiglipVisionConfig", "SiglipVisionModel"),
    "whisper_enc": _whisper,
    "wav2vec2_stable": _audio("Wav2Vec2Config", "Wav2Vec2Model", **_STABLE_LN_AUDIO),
    "hubert_stable": _audio("HubertConfig", "HubertModel", **_STABLE_LN_AUDIO),
    "cait_like_dinov2_ls": _vision("Dinov2Config", mlp_ratio=2, layerscale_value=0.5),
    "convnext_v1": _vision(
        "ConvNextConfig",
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_stages=2,
        layer_scale_init_value=0.5,
    ),
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random γ/β on every norm and random layer scales: default values hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            norm = "norm" in type(mod).__name__.lower()
            for pname, p in mod.named_parameters(recurse=False):
                scale = any(k in pname.lower() for k in ("lambda", "layer_scale", "gamma"))
                if (norm or scale) and p.dim() >= 1:
                    shift = 0.0 if pname == "bias" else (0.0 if scale else 1.0)
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3 + shift)
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def run(name: str, build: Callable[[], tuple]) -> dict[str, Any]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        model, inputs = build()
    except Exception as e:
        return {"status": "not built", "error": f"{type(e).__name__}: {str(e)[:160]}"}
    model = randomize(model).eval()
    try:
        # fp64 default dtype too: constants built from finfo(fp64) (XGLM's mask floor) must not
        # be materialised as fp32
        with torch.no_grad(), _default_dtype(torch.float64):
            ref = tensor_leaves(
                copy.deepcopy(model).double()(
                    *(x.double() if x.is_floating_point() else x for x in inputs)
                )
            )
    except Exception as e:
        return {"status": "no fp64 reference", "error": f"{type(e).__name__}: {str(e)[:160]}"}
    try:
        with torch.no_grad():
            gm = trace(model, inputs, "export").graph_module
    except Exception as e:
        return {"status": "not traced", "error": f"{type(e).__name__}: {str(e)[:160]}"}
    lns = [n for n in find_norms(gm) if n.kind == "layernorm"]
    claimed = {
        k
        for k, v in LnToRmsNorm().explain(gm, PassContext()).items()
        if v.startswith("convertible")
    }
    result = LnToRmsNorm()(gm)
    left = {n.label for n in find_norms(gm) if n.kind == "layernorm"}
    with torch.no_grad():
        err = compare(ref, tensor_leaves(gm(*inputs))).max_rel_err
    reasons: dict[str, int] = {}
    for s in result.skipped:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    converted = len(lns) - len(left)
    return {
        "status": "ok",
        "layernorms": len(lns),
        "converted": converted,
        "refused": len(result.skipped),
        "reasons": reasons,
        "notes": list(result.notes) if hasattr(result, "notes") else [],
        "wrong": bool(err > TOL) if result.modified else False,
        "max_rel_err": err,
        "explain_matches": len(claimed) == converted,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str]) -> None:
    names = argv or list(ARCHS)
    rows = json.loads(OUT.read_text()) if OUT.exists() and argv else {}
    for name in names:
        rows[name] = run(name, ARCHS[name])
        r = rows[name]
        print(name, {k: r[k] for k in r if k not in ("reasons",)}, flush=True)
        for reason in r.get("reasons", {}):
            print("    ", reason[:200])
    OUT.write_text(json.dumps(rows, indent=1) + "\n")
    ok = [r for r in rows.values() if r["status"] == "ok" and r["layernorms"]]
    full = sum(r["converted"] == r["layernorms"] for r in ok)
    print(f"all converted: {full}/{len(ok)}; wrong: {sum(r['wrong'] for r in ok)}")


if __name__ == "__main__":
    main(sys.argv[1:])
