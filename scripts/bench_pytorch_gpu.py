"""PyTorch GPU baseline for the engine's GPU benchmark (issue: GPU performance).

Times, at ViT-B/32 (224 px, 100 classes, batch 256, bf16 autocast, random data):
  1. a teacher training step (dense forward, backward, fused AdamW);
  2. a distillation step at ranks 16, 32, 64, 128: teacher forward (no grad),
     student forward + backward with the KD loss (T=4, alpha=0.5), fused AdamW;
     and the same with cached teacher logits (student only);
  3. inference (teacher forward) images/s.
Each in eager mode and with torch.compile; attention through SDPA (timm's
fused_attn). The student is timm's model with every qkv/proj/fc1/fc2 replaced
by a low-rank pair (q, k, v factorized separately, as the engine does).

Run on the GPU machine (python3 there has torch and timm):
    python3 scripts/bench_pytorch_gpu.py --out bench/logs/pytorch_gpu.json
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm


class LowRank(nn.Module):
    """y = U (V x) + b."""

    def __init__(self, inp, out, r):
        super().__init__()
        self.v = nn.Linear(inp, r, bias=False)
        self.u = nn.Linear(r, out, bias=True)

    def forward(self, x):
        return self.u(self.v(x))


class LowRankQKV(nn.Module):
    """q, k, v as three separate low-rank layers, concatenated like timm's qkv."""

    def __init__(self, dim, r):
        super().__init__()
        self.q, self.k, self.v = LowRank(dim, dim, r), LowRank(dim, dim, r), LowRank(dim, dim, r)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def make_student(rank, classes):
    m = timm.create_model("vit_base_patch32_224", pretrained=False, num_classes=classes)
    d = m.embed_dim
    for blk in m.blocks:
        blk.attn.qkv = LowRankQKV(d, rank)
        blk.attn.proj = LowRank(d, d, rank)
        blk.mlp.fc1 = LowRank(d, blk.mlp.fc1.out_features, rank)
        blk.mlp.fc2 = LowRank(blk.mlp.fc2.in_features, d, rank)
    return m


def kd_loss(s, t, y, T=4.0, alpha=0.5):
    kd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True) * T * T
    return (1 - alpha) * F.cross_entropy(s, y) + alpha * kd


def bench(fn, warmup=5, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--ranks", default="16,32,64,128")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    B, C = args.batch, args.classes
    x = torch.randn(B, 3, 224, 224, device=dev)
    y = torch.randint(0, C, (B,), device=dev)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "timm": timm.__version__, "batch": B, "rows": []}

    def record(name, mode, seconds):
        row = {"step": name, "mode": mode, "ms": seconds * 1e3, "images_per_s": B / seconds}
        results["rows"].append(row)
        print(f"{name:<32} {mode:<8} {seconds*1e3:9.2f} ms  {B/seconds:10.1f} images/s", flush=True)

    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    for mode in modes:
        wrap = (lambda m: torch.compile(m)) if mode == "compile" else (lambda m: m)
        teacher = timm.create_model("vit_base_patch32_224", pretrained=False, num_classes=C).to(dev)
        opt = torch.optim.AdamW(teacher.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        tf = wrap(teacher)

        def teacher_step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(tf(x), y)
            loss.backward()
            opt.step()

        record("teacher_train_step", mode, bench(teacher_step))

        def infer():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                tf(x)

        record("teacher_inference", mode, bench(infer))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            cached = tf(x).float()
        for r in [int(v) for v in args.ranks.split(",")]:
            student = make_student(r, C).to(dev)
            sopt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
            sf = wrap(student)

            def distill_step(live=True):
                sopt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    if live:
                        with torch.no_grad():
                            t = tf(x).float()
                    else:
                        t = cached
                    loss = kd_loss(sf(x).float(), t, y)
                loss.backward()
                sopt.step()

            record(f"distill_step_r{r}", mode, bench(lambda: distill_step(True)))
            record(f"distill_step_cached_r{r}", mode, bench(lambda: distill_step(False)))
            del student, sopt, sf
            torch.cuda.empty_cache()
        del teacher, opt, tf
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
