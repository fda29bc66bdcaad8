"""Fixtures for the importers' hub folders, heads rule and input-size resampling
(tests/import_fixtures.rs), each from the library's own code.

    pip install --target /tmp/torchdeps torch timm transformers safetensors
    PYTHONPATH=/tmp/torchdeps python3 scripts/make_import_fixtures.py

Writes into tests/fixtures/import/ (about 0.5 MB in all):
  hf_vit/config.json, hf_vit/model.safetensors
      transformers' ViTForImageClassification (width 64, 2 heads, depth 1,
      MLP 64, 32 px, patch 8, 5 named classes), as save_pretrained writes it.
  timm_vit/config.json, timm_vit/model.safetensors
      timm's vit_tiny_patch16_224 with model_args (width 64, 2 heads, depth 1,
      MLP 64, 32 px, patch 8, 5 classes), as timm's save_for_hf writes it.
  torchvision_vit.safetensors
      torchvision's VisionTransformer (the same shape), bare state dict.
  reference.safetensors
      input32 [2,3,32,32], input48 [2,3,48,48]; logits_<lib>_<size> for lib in
      hf, timm, torchvision and size 32, 48: the library's own forward, at 48
      px with the position embedding resampled by timm's
      resample_abs_pos_embed (bicubic, antialias=True, class token kept);
      resample_src [4,4,3] and resample_<aa|plain>_<n> [n,n,3]: torch's
      F.interpolate bicubic (align_corners=False) of it, channels last.
Weights are each library's init plus seeded noise (so no parameter is trivial).
"""
import os

import torch
import torch.nn.functional as F
import timm
from timm.layers import resample_abs_pos_embed
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "import")
WIDTH, HEADS, DEPTH, MLP, IMG, PATCH, CLASSES = 64, 2, 1, 64, 32, 8, 5
BIG = 48


def noisy(m, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.float().eval()


def resampled(pos, old_grid, new_grid):
    return resample_abs_pos_embed(pos, new_size=[new_grid, new_grid], old_size=[old_grid, old_grid],
                                  num_prefix_tokens=1)


def hugging_face(ref, x32, x48):
    from transformers import ViTConfig, ViTForImageClassification
    names = ["cat", "dog", "fox", "owl", "yak"]
    cfg = ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                    intermediate_size=MLP, image_size=IMG, patch_size=PATCH, num_labels=CLASSES,
                    id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(1)
    m = noisy(ViTForImageClassification(cfg), 11)
    m.save_pretrained(os.path.join(OUT, "hf_vit"), safe_serialization=True)
    with torch.no_grad():
        ref["logits_hf_32"] = m(pixel_values=x32).logits
        big_cfg = ViTConfig.from_dict({**cfg.to_dict(), "image_size": BIG})
        big = ViTForImageClassification(big_cfg).float().eval()
        sd = m.state_dict()
        key = "vit.embeddings.position_embeddings"
        sd[key] = resampled(sd[key], IMG // PATCH, BIG // PATCH)
        big.load_state_dict(sd)
        ref["logits_hf_48"] = big(pixel_values=x48).logits


def timm_folder(ref, x32, x48):
    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                mlp_ratio=MLP / WIDTH, num_classes=CLASSES)
    torch.manual_seed(2)
    m = noisy(timm.create_model("vit_tiny_patch16_224", pretrained=False, **args), 12)
    timm.models.save_for_hf(m, os.path.join(OUT, "timm_vit"), model_args=args,
                            safe_serialization=True)
    with torch.no_grad():
        ref["logits_timm_32"] = m(x32)
        m.set_input_size(img_size=(BIG, BIG))  # resample_abs_pos_embed, antialias=True
        ref["logits_timm_48"] = m(x48)


def torchvision_file(ref, x32, x48):
    from torchvision.models.vision_transformer import VisionTransformer
    shape = dict(patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS, hidden_dim=WIDTH, mlp_dim=MLP,
                 num_classes=CLASSES)
    torch.manual_seed(3)
    m = noisy(VisionTransformer(image_size=IMG, **shape), 13)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd, os.path.join(OUT, "torchvision_vit.safetensors"))
    with torch.no_grad():
        ref["logits_torchvision_32"] = m(x32)
        big = VisionTransformer(image_size=BIG, **shape).float().eval()
        sd["encoder.pos_embedding"] = resampled(sd["encoder.pos_embedding"], IMG // PATCH, BIG // PATCH)
        big.load_state_dict(sd)
        ref["logits_torchvision_48"] = big(x48)


def resample_cases(ref):
    torch.manual_seed(4)
    src = torch.randn(1, 3, 4, 4)
    ref["resample_src"] = src[0].permute(1, 2, 0)
    for n in (2, 3, 6, 7):
        for aa in (True, False):
            out = F.interpolate(src, size=(n, n), mode="bicubic", align_corners=False, antialias=aa)
            ref[f"resample_{'aa' if aa else 'plain'}_{n}"] = out[0].permute(1, 2, 0)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    ref = {"input32": torch.randn(2, 3, IMG, IMG), "input48": torch.randn(2, 3, BIG, BIG)}
    hugging_face(ref, ref["input32"], ref["input48"])
    timm_folder(ref, ref["input32"], ref["input48"])
    torchvision_file(ref, ref["input32"], ref["input48"])
    resample_cases(ref)
    save_file({k: v.float().contiguous() for k, v in ref.items()},
              os.path.join(OUT, "reference.safetensors"))


if __name__ == "__main__":
    main()
