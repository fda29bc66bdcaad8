"""PyTorch (oneDNN) CPU matrix products on the shapes of benches/cpu_gemm.rs,
the reference for README "CPU performance":

    pip install --target /tmp/torchdeps torch
    PYTHONPATH=/tmp/torchdeps python3 scripts/bench_pytorch_gemm.py --threads 2

Prints GFLOP/s (median of 7 rounds) of y = x·Wᵀ (forward), dx = dy·W (input
gradient) and dW = dyᵀ·x (weight gradient) for each layer shape.
"""
import argparse
import time

import torch


def gflops(fn, flops, reps):
    for _ in range(2):
        fn()
    rates = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rates.append(flops * reps / (time.perf_counter() - t0) / 1e9)
    rates.sort()
    return rates[len(rates) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"PyTorch {torch.__version__} CPU GEMM, {args.threads} threads, GFLOP/s (median of 7 rounds)")
    print(f"{'layer (rows, in, out)':<36} {'x·Wᵀ':>7} {'dy·W':>7} {'dyᵀ·x':>7}")
    layers = [
        ("vit-cifar qkv/proj", 4160, 192, 192),
        ("vit-cifar fc1", 4160, 192, 768),
        ("vit-cifar fc2", 4160, 768, 192),
        ("vit-b32 qkv/proj", 400, 768, 768),
        ("vit-b32 fc1", 400, 768, 3072),
        ("vit-b32 fc2", 400, 3072, 768),
    ]
    with torch.no_grad():
        for name, rows, inp, out in layers:
            x, w, dy = torch.randn(rows, inp), torch.randn(out, inp), torch.randn(rows, out)
            dw = torch.zeros(out, inp)
            flops = 2.0 * rows * inp * out
            reps = max(1, int(2e9 / flops))
            fwd = gflops(lambda: torch.nn.functional.linear(x, w), flops, reps)
            dx = gflops(lambda: dy @ w, flops, reps)
            dwt = gflops(lambda: dw.addmm_(dy.t(), x), flops, reps)
            print(f"{name + f' ({rows}, {inp}, {out})':<36} {fwd:>7.0f} {dx:>7.0f} {dwt:>7.0f}")


if __name__ == "__main__":
    main()
