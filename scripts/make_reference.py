"""Reference outputs of a small timm ViT for the parity tests (tests/timm_parity.rs).

    pip install --target /tmp/torchdeps torch timm safetensors
    PYTHONPATH=/tmp/torchdeps python3 scripts/make_reference.py

Builds timm's VisionTransformer (32 px, patch 8, width 64, depth 2, 4 heads,
MLP 256, 10 classes, class-token pooling, exact GELU, LayerNorm eps 1e-6) with
seeded random weights (timm's init plus noise, so biases and LayerNorm
parameters are not trivial) and writes into tests/data/:
  timm_tiny.safetensors          the weights, timm names
  timm_tiny_bf16.safetensors     the same in bf16 (dtype loading)
  torchvision_tiny.safetensors   the same weights, torchvision vit_b_32 names
  hf_tiny.safetensors            the same weights, Hugging Face ViTForImageClassification names
  reference_io.safetensors       input [4,3,32,32], labels, logits (eps 1e-6),
                                 logits_hf (every LayerNorm eps 1e-12), the mean
                                 cross-entropy `loss`, and grad.<timm name> of
                                 several parameters (eps 1e-6 model).
"""
import os

import torch
import timm
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data")
GRADS = [
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "cls_token",
    "pos_embed",
    "blocks.0.norm1.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight",
    "blocks.1.mlp.fc1.weight",
    "blocks.1.mlp.fc2.weight",
    "norm.weight",
    "head.weight",
    "head.bias",
]


def build():
    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
        num_classes=10, global_pool="token", qkv_bias=True, class_token=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.float().eval()


def torchvision_names(sd, depth):
    out = {
        "class_token": sd["cls_token"],
        "encoder.pos_embedding": sd["pos_embed"],
        "conv_proj.weight": sd["patch_embed.proj.weight"],
        "conv_proj.bias": sd["patch_embed.proj.bias"],
        "encoder.ln.weight": sd["norm.weight"],
        "encoder.ln.bias": sd["norm.bias"],
        "heads.head.weight": sd["head.weight"],
        "heads.head.bias": sd["head.bias"],
    }
    for i in range(depth):
        a, b = f"blocks.{i}.", f"encoder.layers.encoder_layer_{i}."
        pairs = {
            "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias",
            "attn.qkv.weight": "self_attention.in_proj_weight", "attn.qkv.bias": "self_attention.in_proj_bias",
            "attn.proj.weight": "self_attention.out_proj.weight", "attn.proj.bias": "self_attention.out_proj.bias",
            "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias",
            "mlp.fc1.weight": "mlp.0.weight", "mlp.fc1.bias": "mlp.0.bias",
            "mlp.fc2.weight": "mlp.3.weight", "mlp.fc2.bias": "mlp.3.bias",
        }
        for k, v in pairs.items():
            out[b + v] = sd[a + k]
    return out


def hf_names(sd, depth, d):
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"],
        "classifier.bias": sd["head.bias"],
    }
    for i in range(depth):
        a, b = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        w, bias = sd[a + "attn.qkv.weight"], sd[a + "attn.qkv.bias"]
        for j, name in enumerate(["query", "key", "value"]):
            out[b + f"attention.attention.{name}.weight"] = w[j * d:(j + 1) * d]
            out[b + f"attention.attention.{name}.bias"] = bias[j * d:(j + 1) * d]
        pairs = {
            "norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
            "attn.proj.weight": "attention.output.dense.weight", "attn.proj.bias": "attention.output.dense.bias",
            "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
            "mlp.fc1.weight": "intermediate.dense.weight", "mlp.fc1.bias": "intermediate.dense.bias",
            "mlp.fc2.weight": "output.dense.weight", "mlp.fc2.bias": "output.dense.bias",
        }
        for k, v in pairs.items():
            out[b + v] = sd[a + k]
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    m = build()
    sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    save_file(sd, os.path.join(OUT, "timm_tiny.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, os.path.join(OUT, "timm_tiny_bf16.safetensors"))
    save_file({k: v.contiguous() for k, v in torchvision_names(sd, 2).items()}, os.path.join(OUT, "torchvision_tiny.safetensors"))
    save_file({k: v.contiguous() for k, v in hf_names(sd, 2, 64).items()}, os.path.join(OUT, "hf_tiny.safetensors"))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    logits = m(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    params = dict(m.named_parameters())
    io = {"input": x, "labels": y.to(torch.int64), "logits": logits.detach(), "loss": loss.detach().reshape(1)}
    for name in GRADS:
        io["grad." + name] = params[name].grad.detach().clone()

    hf = build()
    for mod in hf.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = 1e-12
    io["logits_hf"] = hf(x).detach()
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(OUT, "reference_io.safetensors"))
    print("logits[0]:", logits[0].tolist())
    print("loss:", loss.item())


if __name__ == "__main__":
    main()
