"""Fixtures for the ViT families (tests/family_parity.rs): one small random
model per family and naming scheme, saved as its library saves it, with
reference outputs from the library's own forward.

    pip install --target /tmp/torchdeps torch timm transformers safetensors
    PYTHONPATH=/tmp/torchdeps python3 scripts/make_family_fixtures.py

(made with torch 2.15, timm 1.0.31, transformers 5.25; CI never runs it).
Every model has width 32, 2 heads, MLP 64, patch 8, 32 px input and 5
classes; depth 1, or 2 where marked, so that a test can take a tensor out of
one block only. Weights are the library's init plus seeded Gaussian noise
(std 0.2: attention far from uniform and MLP inputs of order one, so that
QuickGELU in place of GELU moves the logits by about 0.6%; tanh GELU in place
of exact GELU only by about 1.2e-4, the two being that close). LayerScale
gammas are then set to 0.5 + 0.25 * noise, so that they matter (timm inits
them to 1e-5).

Writes into tests/fixtures/families/ (about 1.2 MB in all; run twice, the same bytes):

timm hub folders (config.json + model.safetensors, as timm.models.save_for_hf
writes them: `architecture` is the model name, `model_args` the overrides
given to timm.create_model):
  timm_deit_distilled/  deit_tiny_distilled_patch16_224 (dist token, head and
                        head_dist; the eval forward averages the two heads)
  timm_deit3/           deit3_small_patch16_224 (no_embed_class, LayerScale),
                        depth 2
  timm_dinov2/          vit_small_patch14_dinov2 (LayerScale, position
                        embedding over class token and patches), depth 2
  timm_dinov2_reg4/     vit_small_patch14_reg4_dinov2 (4 registers,
                        no_embed_class, LayerScale)
  timm_clip/            vit_base_patch32_clip_224 (norm_pre, no patch bias,
                        LayerNorm eps 1e-5, exact GELU)
  timm_clip_quickgelu/  vit_base_patch32_clip_quickgelu_224 (the same with
                        QuickGELU)
  timm_avg/             vit_base_patch32_224 with global_pool='avg',
                        class_token=False (fc_norm, mean of the patches)
  timm_no_qkv_bias/     vit_base_patch32_224 with qkv_bias=False

Hugging Face folders (config.json + model.safetensors, as save_pretrained
writes them):
  hf_deit/              DeiTForImageClassification (dist token in the
                        sequence, classifier on the class token only)
  hf_deit_teacher/      DeiTForImageClassificationWithTeacher (cls_classifier
                        and distillation_classifier, logits averaged)
  hf_dinov2/            Dinov2Model (headless), depth 2
  hf_dinov2_cls/        Dinov2ForImageClassification (classifier over
                        [class token ; mean of patch tokens], 2 * width), depth 2
  hf_dinov2_reg/        Dinov2WithRegistersModel (headless, 4 registers)
  hf_dinov2_reg_cls/    Dinov2WithRegistersForImageClassification
  hf_clip/              CLIPVisionModel (headless; quick_gelu, pre_layrnorm,
                        post_layernorm, no patch bias, eps 1e-5)

reference.safetensors (float32):
  input32 [2,3,32,32], input48 [2,3,48,48]: the inputs (standard normal).
  logits_<folder>_<32|48> [2,5]: the logits of the library's forward, for
      every folder with a classification head.
  features_<folder>_<32|48> [2,32]: for the headless hf_dinov2, hf_dinov2_reg
      and hf_clip, the pooler output: the final LayerNorm of the class token
      (Dinov2 `layernorm`, CLIP `post_layernorm`). An engine that attaches a
      head of width classes set to the identity (weight I, bias 0) gives these
      as its logits.
  At 48 px every model runs with its position embedding resampled from the
  32 px one by timm's resample_abs_pos_embed (bicubic, align_corners=False,
  antialias=True), the prefix tokens that carry a position kept: timm through
  model.set_input_size; Hugging Face by building the model at 48 px and
  loading the resampled embedding (so Dinov2's own interpolation, which has
  antialias=False, is not what is compared: the engine resamples as timm does).
"""
import os

import torch
import timm
from timm.layers import resample_abs_pos_embed
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "families")
WIDTH, HEADS, MLP, IMG, PATCH, CLASSES = 32, 2, 64, 32, 8, 5
BIG = 48
NOISE = 0.2  # large enough that attention is far from uniform and the activation matters


def noisy(m, seed):
    """Init plus noise; LayerScale gammas (timm ls*.gamma, HF lambda1) O(0.5)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(NOISE * torch.randn_like(p))
            if name.endswith(".gamma") or name.endswith(".lambda1"):
                p.copy_(0.5 + 0.25 * torch.randn_like(p))
    return m.float().eval()


def resampled(pos, prefix):
    """A [1, prefix + 16, D] position embedding resampled to 48 px (6 x 6)."""
    return resample_abs_pos_embed(pos, new_size=[BIG // PATCH] * 2, old_size=[IMG // PATCH] * 2,
                                  num_prefix_tokens=prefix)


TIMM = [
    # (folder, timm model name, extra model_args, depth)
    ("timm_deit_distilled", "deit_tiny_distilled_patch16_224", {}, 1),
    ("timm_deit3", "deit3_small_patch16_224", {}, 2),
    ("timm_dinov2", "vit_small_patch14_dinov2", {}, 2),
    ("timm_dinov2_reg4", "vit_small_patch14_reg4_dinov2", {}, 1),
    ("timm_clip", "vit_base_patch32_clip_224", {}, 1),
    ("timm_clip_quickgelu", "vit_base_patch32_clip_quickgelu_224", {}, 1),
    ("timm_avg", "vit_base_patch32_224", dict(global_pool="avg", class_token=False), 1),
    ("timm_no_qkv_bias", "vit_base_patch32_224", dict(qkv_bias=False), 1),
]


def timm_models(ref, seed):
    for folder, name, extra, depth in TIMM:
        seed += 1
        args = dict(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=depth, num_heads=HEADS,
                    mlp_ratio=MLP / WIDTH, num_classes=CLASSES, **extra)
        torch.manual_seed(seed)
        m = noisy(timm.create_model(name, pretrained=False, **args), 100 + seed)
        timm.models.save_for_hf(m, os.path.join(OUT, folder), model_args=args,
                                safe_serialization=True)
        with torch.no_grad():
            ref[f"logits_{folder}_32"] = m(ref["input32"])
            m.set_input_size(img_size=(BIG, BIG))  # resample_abs_pos_embed, antialias=True
            ref[f"logits_{folder}_48"] = m(ref["input48"])


def hf_models():
    import transformers as T
    deit = dict(intermediate_size=MLP)
    dinov2 = dict(mlp_ratio=MLP // WIDTH)
    regs = dict(dinov2, num_register_tokens=4)
    clip = dict(intermediate_size=MLP, hidden_act="quick_gelu")
    # (folder, config class, model class, config args, depth, position key,
    #  prefix tokens with a position, output)
    pos_deit = "deit.embeddings.position_embeddings"
    return [
        ("hf_deit", T.DeiTConfig, T.DeiTForImageClassification, deit, 1, pos_deit, 2, "logits"),
        ("hf_deit_teacher", T.DeiTConfig, T.DeiTForImageClassificationWithTeacher, deit, 1,
         pos_deit, 2, "logits"),
        ("hf_dinov2", T.Dinov2Config, T.Dinov2Model, dinov2, 2, "embeddings.position_embeddings", 1,
         "features"),
        ("hf_dinov2_cls", T.Dinov2Config, T.Dinov2ForImageClassification, dinov2, 2,
         "dinov2.embeddings.position_embeddings", 1, "logits"),
        ("hf_dinov2_reg", T.Dinov2WithRegistersConfig, T.Dinov2WithRegistersModel, regs, 1,
         "embeddings.position_embeddings", 1, "features"),
        ("hf_dinov2_reg_cls", T.Dinov2WithRegistersConfig,
         T.Dinov2WithRegistersForImageClassification, regs, 1,
         "dinov2_with_registers.embeddings.position_embeddings", 1, "logits"),
        ("hf_clip", T.CLIPVisionConfig, T.CLIPVisionModel, clip, 1,
         "embeddings.position_embedding.weight", 1, "features"),
    ]


def hf_output(m, x, kind):
    out = m(pixel_values=x)
    return out.logits if kind == "logits" else out.pooler_output


def hugging_face_models(ref, seed):
    for folder, config, model, args, depth, pos_key, prefix, kind in hf_models():
        seed += 1
        cfg = config(hidden_size=WIDTH, num_hidden_layers=depth, num_attention_heads=HEADS,
                     image_size=IMG, patch_size=PATCH, num_labels=CLASSES, **args)
        torch.manual_seed(seed)
        m = noisy(model(cfg), 100 + seed)
        m.save_pretrained(os.path.join(OUT, folder), safe_serialization=True)
        with torch.no_grad():
            ref[f"{kind}_{folder}_32"] = hf_output(m, ref["input32"], kind)
            big = model(config.from_dict({**cfg.to_dict(), "image_size": BIG})).float().eval()
            sd = m.state_dict()
            pos = sd[pos_key]
            flat = pos.dim() == 2  # CLIP's nn.Embedding: [tokens, D]
            new = resampled(pos[None] if flat else pos, prefix)
            sd[pos_key] = new[0] if flat else new
            big.load_state_dict(sd)
            ref[f"{kind}_{folder}_48"] = hf_output(big, ref["input48"], kind)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    ref = {"input32": torch.randn(2, 3, IMG, IMG), "input48": torch.randn(2, 3, BIG, BIG)}
    timm_models(ref, 0)
    hugging_face_models(ref, 50)
    save_file({k: v.float().contiguous() for k, v in ref.items()},
              os.path.join(OUT, "reference.safetensors"))


if __name__ == "__main__":
    main()
