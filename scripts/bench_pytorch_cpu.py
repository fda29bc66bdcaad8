"""PyTorch CPU baseline for benches/cpu.rs: the same shapes, the same thread count.

    pip install --target /tmp/torchdeps torch timm
    PYTHONPATH=/tmp/torchdeps python3 scripts/bench_pytorch_cpu.py --threads 2

Prints images/s of (1) a training step (forward, backward, AdamW) of the
CIFAR-native ViT (32 px, patch 4, width 192, depth 6, 3 heads, MLP 768, 100
classes) at batch 64 and (2) a ViT-B/32 forward at batch 8, 100 classes, fp32.
With --profile, then the time per operator of that forward (PyTorch's
profiler over 10 forwards; divide by 10 for one).

With --serve it times nothing on its own: it builds both models, prints
"ready", then answers each line "train N" or "forward N" on standard input
with the mean seconds per iteration of N iterations, one line each, until
"quit" or end of input. `cargo bench --bench cpu_vs_pytorch` drives it,
alternating with the engine round by round.
"""
import argparse
import sys
import time

import torch
import timm


def timeit(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="also print the forward's time per operator")
    ap.add_argument("--serve", action="store_true", help="time on request from standard input (see above)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cifar = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0,
        num_classes=100, global_pool="token", qkv_bias=True)
    opt = torch.optim.AdamW(cifar.parameters(), lr=1e-4, weight_decay=0.01)
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 100, (64,))

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(cifar(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cifar.parameters(), 1.0)
        opt.step()

    b32 = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=32, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
        num_classes=100, global_pool="token", qkv_bias=True).eval()
    xb = torch.randn(8, 3, 224, 224)

    def forward():
        with torch.no_grad():
            b32(xb)

    if args.serve:
        serve({"train": train_step, "forward": forward})
        return

    t = timeit(train_step, 2, args.iters)
    print(f"pytorch train_step vit-cifar b64: {t*1e3:.1f} ms/step, {64/t:.1f} images/s")

    t = timeit(forward, 2, args.iters)
    print(f"pytorch forward vit-b32 b8: {t*1e3:.1f} ms, {8/t:.1f} images/s")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                forward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def serve(workloads):
    """Answer "NAME N" lines with the mean seconds of N runs of workloads[NAME]."""
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        fn, n = workloads[words[0]], int(words[1])
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        print(f"{(time.perf_counter() - t0) / n:.6f}", flush=True)


if __name__ == "__main__":
    main()
