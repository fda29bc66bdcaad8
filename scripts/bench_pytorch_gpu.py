"""PyTorch GPU baseline for the engine's GPU benchmark (issue: GPU performance).

Times, at ViT-B/32 (224 px, 100 classes, batch 256, bf16 autocast, random data):
  1. a teacher training step (dense forward, backward, fused AdamW);
  2. a distillation step at ranks 16, 32, 64, 128: teacher forward (no grad),
     student forward + backward with the KD loss (T=4, alpha=0.5), fused AdamW;
     and the same with cached teacher logits (student only);
  3. inference (teacher forward) images/s.
Each in eager mode and with torch.compile (--compile-ranks: the ranks that
are compiled too); attention through SDPA (timm's fused_attn). The student is
timm's model with every qkv/proj/fc1/fc2 replaced by a low-rank pair (q, k, v
factorized separately, as the engine does).
  --sdpa: SDPA alone at ViT-B/32's attention shape (batch 256, 50 tokens, 12
     heads of 64, bf16), forward and forward + backward (the engine's
     `cargo bench --bench kernels` times its attention kernels there).
  --protocol: eager, the reference protocol's steps (teacher batch 32 with
     cross-entropy; students at ranks 16, 64, 256, batch 24, geometric feature
     loss over the 24 block features and the logits with the teacher run live;
     inference at batch 32), on 224 px inputs, with the GPU-hours they project
     (the engine's `cargo bench --bench step` prints the same projection).
--warmup and --iters set the repeats of every timing (median of --iters).

Run on the GPU machine (python3 there has torch and timm):
    python3 scripts/bench_pytorch_gpu.py --out bench/logs/pytorch_gpu.json
"""
import argparse
import json
import sys

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import timm
except ImportError as e:
    print(f"PyTorch or timm is not installed ({e}): skipping the PyTorch GPU baseline")
    sys.exit(0)


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


def features_of(model):
    """Registers hooks that collect each block's attention and MLP outputs
    (before the residual add), in order; returns the list they fill."""
    feats = []
    for blk in model.blocks:
        blk.attn.register_forward_hook(lambda m, i, o: feats.append(o))
        blk.mlp.register_forward_hook(lambda m, i, o: feats.append(o))
    return feats


def geometric_loss(s_feats, t_feats, s_logits, t_logits):
    """Mean over the block features and the logits of MSE + (1 - cosine)."""
    terms = list(zip(s_feats, t_feats)) + [(s_logits, t_logits)]
    total = 0.0
    for s, t in terms:
        s, t = s.float(), t.float()
        total = total + F.mse_loss(s, t) + (1 - F.cosine_similarity(s, t, dim=-1).mean())
    return total / len(terms)


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
    ap.add_argument("--compile-ranks", help="ranks also timed with torch.compile (default: --ranks)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--sdpa", action="store_true")
    ap.add_argument("--protocol", action="store_true")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    timing = dict(warmup=args.warmup, iters=args.iters)
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to PyTorch: skipping the PyTorch GPU baseline")
        return
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    B, C = args.batch, args.classes
    x = torch.randn(B, 3, 224, 224, device=dev)
    y = torch.randint(0, C, (B,), device=dev)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "timm": timm.__version__, "batch": B, "rows": []}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    def record(name, mode, seconds, batch=B):
        row = {"step": name, "mode": mode, "ms": seconds * 1e3, "images_per_s": batch / seconds}
        results["rows"].append(row)
        print(f"{name:<32} {mode:<8} {seconds*1e3:9.2f} ms  {batch/seconds:10.1f} images/s", flush=True)
        save()

    # Eager first, then the SDPA and protocol rows, torch.compile last (its
    # compilations take the longest): a run cut short by its time limit
    # keeps what came before, in the log and in --out (rewritten every row).
    def extras():
        if args.sdpa:
            sdpa(record, timing)
        if args.protocol:
            results["protocol"] = protocol(record, timing, C)
            save()

    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    for mode in modes:
        if mode == "compile":
            extras()
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

        record("teacher_train_step", mode, bench(teacher_step, **timing))

        def infer():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                tf(x)

        record("teacher_inference", mode, bench(infer, **timing))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            cached = tf(x).float()
        ranks = args.ranks if mode == "eager" or args.compile_ranks is None else args.compile_ranks
        for r in [int(v) for v in ranks.split(",") if v]:
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

            record(f"distill_step_r{r}", mode, bench(lambda: distill_step(True), **timing))
            record(f"distill_step_cached_r{r}", mode, bench(lambda: distill_step(False), **timing))
            del student, sopt, sf
            torch.cuda.empty_cache()
        del teacher, opt, tf
        torch.cuda.empty_cache()
    if args.no_compile:
        extras()


def sdpa(record, timing):
    """SDPA forward and forward + backward at ViT-B/32's attention shape."""
    b, h, t, d = 256, 12, 50, 64
    q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v).backward(dout)

    record("sdpa_forward_b256_t50_h12x64", "eager", bench(fwd, **timing), batch=b)
    record("sdpa_fwd_bwd_b256_t50_h12x64", "eager", bench(fwd_bwd, **timing), batch=b)


def protocol(record, timing, classes):
    """The reference protocol's steps in eager PyTorch and their GPU-hours
    (METHOD.md: teacher 20 epochs at batch 32; 16 ranks x 200 epochs at batch
    24; 50,000 training and 10,000 test images; one evaluation per run)."""
    tb, sb = 32, 24
    grid = [2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    measured_ranks = [16, 64, 256]
    xt, yt = torch.randn(tb, 3, 224, 224, device="cuda"), torch.randint(0, classes, (tb,), device="cuda")
    xs, ys = xt[:sb], yt[:sb]
    teacher = timm.create_model("vit_base_patch32_224", pretrained=False, num_classes=classes).cuda()
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

    def teacher_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(teacher(xt), yt)
        loss.backward()
        opt.step()

    t_step = bench(teacher_step, **timing)
    record("protocol_teacher_step_b32", "eager", t_step, batch=tb)

    def infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            teacher(xt)

    t_eval = bench(infer, **timing)
    record("protocol_inference_b32", "eager", t_eval, batch=tb)
    t_feats = features_of(teacher)
    rates = {}
    for r in measured_ranks:
        student = make_student(r, classes).cuda()
        s_feats = features_of(student)
        sopt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

        def student_step():
            sopt.zero_grad(set_to_none=True)
            t_feats.clear()
            s_feats.clear()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                with torch.no_grad():
                    t_logits = teacher(xs)
                # student(xs) fills s_feats before geometric_loss reads it.
                loss = geometric_loss(s_feats, t_feats, student(xs), t_logits)
            loss.backward()
            sopt.step()

        seconds = bench(student_step, **timing)
        record(f"protocol_student_r{r}_b24", "eager", seconds, batch=sb)
        rates[r] = sb / seconds
        del student, sopt
        torch.cuda.empty_cache()

    def rate_at(r):
        pts = sorted(rates.items())
        if r <= pts[0][0]:
            return pts[0][1]
        if r >= pts[-1][0]:
            return pts[-1][1]
        for (r0, v0), (r1, v1) in zip(pts, pts[1:]):
            if r0 <= r <= r1:
                return v0 + (r - r0) / (r1 - r0) * (v1 - v0)

    hours = {
        "teacher": 20 * 50_000 / (tb / t_step) / 3600,
        "students": sum(200 * 50_000 / rate_at(r) / 3600 for r in grid),
        "eval": (1 + len(grid)) * 10_000 / (tb / t_eval) / 3600,
    }
    hours["total"] = sum(hours.values())
    print("protocol projection (eager PyTorch): " + ", ".join(f"{k} {v:.2f} h" for k, v in hours.items()), flush=True)
    return hours


if __name__ == "__main__":
    main()
