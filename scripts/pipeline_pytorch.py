"""The engine's whole pipeline, written in PyTorch + timm the way a user would
write it by hand: the baseline of `cargo bench --bench pipeline_vs_pytorch`.

    pip install --target /tmp/torchdeps torch timm scipy
    PYTHONPATH=/tmp/torchdeps python3 scripts/pipeline_pytorch.py --data DIR --spec SPEC.json

DIR holds the data the engine trains on, exported by the bench
(`train_images.u8`, `train_labels.u8`, `test_images.u8`, `test_labels.u8`:
raw bytes, images [n, channels, side, side]; `data.json`: n, channels,
side, classes). SPEC.json names the model and the schedule (the same
settings the engine's command line gets):

    {"model": {"image_size", "patch", "width", "depth", "heads", "mlp", "classes"},
     "teacher_epochs", "student_epochs", "ranks", "batch", "lr", "min_lr",
     "warmup_epochs", "weight_decay", "teacher_weight_decay", "clip", "crop_padding",
     "flip", "alpha", "temperature", "normalize_mean", "normalize_std", "threads"}

What it does, stage by stage, matching the engine's defaults:
  teacher   timm VisionTransformer (pre-norm, exact GELU, class token, LayerNorm
            eps 1e-6), cross-entropy, AdamW (decay on weight matrices only),
            global-norm clipping, linear warm-up then cosine schedule per step,
            random crop (zero padding) + horizontal flip on the stored images,
            bilinear resize to the model size, per-channel normalization;
            test top-1 after every epoch
  students  for every rank: q, k, v (split from timm's fused qkv), proj, fc1,
            fc2 of every block factorized by truncated SVD (U = U_r S^1/2,
            V = S^1/2 V_r^T), the rest copied; distilled with Hinton KD mixed
            with CE, (1 - alpha) CE + alpha T^2 KL, the teacher run on each
            batch (no_grad), same optimizer and schedule; test top-1 after
            every epoch
  analysis  PCHIP (scipy) through (rank, top-1), the 85% / 95% crossings and
            the knee, as the engine's analysis computes them

Prints one JSON line: seconds per stage and the accuracies.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm


def load(dir):
    meta = json.load(open(os.path.join(dir, "data.json")))
    c, s = meta["channels"], meta["side"]

    def split(name):
        n = meta[f"{name}_n"]
        x = np.fromfile(os.path.join(dir, f"{name}_images.u8"), dtype=np.uint8).reshape(n, c, s, s)
        y = np.fromfile(os.path.join(dir, f"{name}_labels.u8"), dtype=np.uint8).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    return split("train"), split("test"), meta["classes"]


def augment(x, pad, flip, gen):
    """Random crop of the stored size from the zero-padded image, then a flip with probability 1/2."""
    n, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        f = torch.rand(n, generator=gen) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    return x


def model_input(x, size, mean, std):
    x = x.float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - mean) / std


def make_teacher(m):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=m["image_size"], patch_size=m["patch"], embed_dim=m["width"], depth=m["depth"],
        num_heads=m["heads"], mlp_ratio=m["mlp"] / m["width"], num_classes=m["classes"],
        global_pool="token", qkv_bias=True, class_token=True)


def optimizer(model, lr, wd):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step, base, min_lr, warmup, total):
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def evaluate(model, x, y, batch, size, mean, std):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            logits = model(model_input(x[i:i + batch], size, mean, std))
            correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return correct / len(y)


def fit(model, data, spec, epochs, wd, loss_fn, seed):
    (xt, yt), (xv, yv), _ = data
    size = spec["model"]["image_size"]
    mean = torch.tensor(spec["normalize_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec["normalize_std"]).view(1, -1, 1, 1)
    batch = spec["batch"]
    opt = optimizer(model, spec["lr"], wd)
    steps = math.ceil(len(yt) / batch)
    warmup = round(spec["warmup_epochs"] * steps)
    gen = torch.Generator().manual_seed(seed)
    top1 = 0.0
    for epoch in range(epochs):
        order = torch.randperm(len(yt), generator=gen)
        for b in range(steps):
            idx = order[b * batch:(b + 1) * batch]
            x = model_input(augment(xt[idx], spec["crop_padding"], spec["flip"], gen), size, mean, std)
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps + b, spec["lr"], spec["min_lr"], warmup, epochs * steps)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, x, yt[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
            opt.step()
        top1 = evaluate(model, xv, yv, batch, size, mean, std)
    return top1


class LowRank(nn.Module):
    """y = U (V x) + b, from the truncated SVD of a weight."""

    def __init__(self, weight, bias, rank):
        super().__init__()
        u, s, vh = torch.linalg.svd(weight.detach(), full_matrices=False)
        root = s[:rank].sqrt()
        self.v = nn.Linear(weight.shape[1], rank, bias=False)
        self.u = nn.Linear(rank, weight.shape[0], bias=True)
        with torch.no_grad():
            self.v.weight.copy_(root[:, None] * vh[:rank])
            self.u.weight.copy_(u[:, :rank] * root[None, :])
            self.u.bias.copy_(bias.detach())

    def forward(self, x):
        return self.u(self.v(x))


class LowRankQKV(nn.Module):
    """timm's fused qkv as three separate low-rank layers (as the engine factorizes them)."""

    def __init__(self, qkv, rank):
        super().__init__()
        d = qkv.weight.shape[1]
        self.parts = nn.ModuleList(LowRank(qkv.weight[i * d:(i + 1) * d], qkv.bias[i * d:(i + 1) * d], rank) for i in range(3))

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)


def factorize(teacher, rank, model_spec):
    student = make_teacher(model_spec)
    student.load_state_dict(teacher.state_dict())
    for block in student.blocks:
        block.attn.qkv = LowRankQKV(block.attn.qkv, rank)
        block.attn.proj = LowRank(block.attn.proj.weight, block.attn.proj.bias, rank)
        block.mlp.fc1 = LowRank(block.mlp.fc1.weight, block.mlp.fc1.bias, rank)
        block.mlp.fc2 = LowRank(block.mlp.fc2.weight, block.mlp.fc2.bias, rank)
    return student


def analysis(points, teacher_acc):
    from scipy.interpolate import PchipInterpolator
    r = np.array([p[0] for p in points], dtype=float)
    a = np.array([p[1] for p in points], dtype=float)
    f = PchipInterpolator(r, a)
    grid = np.arange(int(r[0]), int(r[-1]) + 1)
    curve = f(grid)
    out = {}
    for frac in (0.85, 0.95):
        hit = np.nonzero(curve >= frac * teacher_acc)[0]
        out[f"r_{int(frac * 100)}"] = int(grid[hit[0]]) if len(hit) else None
    secant = curve[0] + (curve[-1] - curve[0]) * (grid - grid[0]) / max(grid[-1] - grid[0], 1)
    out["knee"] = int(grid[np.argmax(np.abs(curve - secant))])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--spec", required=True)
    args = ap.parse_args()
    spec = json.load(open(args.spec))
    torch.set_num_threads(spec["threads"])
    seed = spec.get("seed", 0)
    torch.manual_seed(seed)
    data = load(args.data)
    times, result = {}, {}

    t0 = time.perf_counter()
    teacher = make_teacher(spec["model"])
    ce = lambda model, x, y: F.cross_entropy(model(x), y)
    result["teacher_top1"] = fit(teacher, data, spec, spec["teacher_epochs"], spec["teacher_weight_decay"], ce, seed)
    times["teacher"] = time.perf_counter() - t0
    if not spec["ranks"]:  # the teacher alone (EFFRANK_PIPELINE_STAGES=teacher)
        times["students"] = times["analysis"] = 0.0
        result["students_top1"] = []
        print(json.dumps({"seconds": times, "result": result}))
        return

    t0 = time.perf_counter()
    teacher.eval()
    (_, _), (xv, yv), _ = data
    mean = torch.tensor(spec["normalize_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec["normalize_std"]).view(1, -1, 1, 1)
    teacher_acc = evaluate(teacher, xv, yv, spec["batch"], spec["model"]["image_size"], mean, std)
    teacher.eval()
    alpha, temp = spec["alpha"], spec["temperature"]

    def kd(model, x, y):
        with torch.no_grad():
            t = teacher(x)
        s = model(x)
        kl = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), reduction="batchmean", log_target=True)
        return (1 - alpha) * F.cross_entropy(s, y) + alpha * temp * temp * kl

    points = []
    for rank in spec["ranks"]:
        student = factorize(teacher, rank, spec["model"])
        student.train()
        points.append((rank, fit(student, data, spec, spec["student_epochs"], spec["weight_decay"], kd, seed)))
    times["students"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result.update(analysis(points, teacher_acc))
    times["analysis"] = time.perf_counter() - t0
    result["students_top1"] = points
    print(json.dumps({"seconds": times, "result": result}))


if __name__ == "__main__":
    main()
