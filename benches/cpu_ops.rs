//! CPU operations of the ViT-B/32 forward and backward at batch 8 (400
//! token rows, width 768, MLP 3072, 12 heads of 64, 50 tokens), one at a
//! time: the non-product operations, and the `x·Wᵀ` products with twelve
//! distinct weight matrices, as a forward pass meets them (each product's
//! weights come from memory, not from the cache the previous call warmed).
//! Prints the median time per call over rounds (each round repeats the call
//! enough to take a few milliseconds) and a rate; the residual add is shown
//! against copy-then-add, what it replaced, in the same run.
//!
//!     cargo bench --bench cpu_ops
//!
//! Threads: every core unless RAYON_NUM_THREADS says otherwise; the work
//! runs on a rayon worker, as in the engine (`on_worker_thread`).

use effrank_engine::device::cpu::on_worker_thread;
use effrank_engine::device::{Cpu, Device};
use effrank_engine::ops::add::{add, add_assign};
use effrank_engine::ops::attention::cpu::{
    attention_backward, attention_forward, products_backward, products_forward,
};
use effrank_engine::ops::attention::{AttentionShape, Qkv};
use effrank_engine::ops::gelu::cpu::{gelu_backward, gelu_backward_recomputing, gelu_forward};
use effrank_engine::ops::layernorm::cpu::{layernorm_backward, layernorm_forward};
use effrank_engine::ops::layernorm::{Grads, Outputs, Params, Saved};
use effrank_engine::ops::matmul::cpu::gemm;
use effrank_engine::ops::matmul::Accumulate;
use effrank_engine::ops::Rows;
use effrank_engine::rng::Rng;
use faer::{MatMut, MatRef};
use std::time::Instant;

const ROWS: usize = 8 * 50;
const WIDTH: usize = 768;
const MLP: usize = 3072;
const HEADS: usize = 12;
const ROUNDS: usize = 15;

/// `q, k, v` as one `Qkv`.
fn qkv<'a>(q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> Qkv<&'a [f32]> {
    Qkv { q, k, v }
}

/// `dq, dk, dv` as one `Qkv`.
fn grads<'a>(q: &'a mut [f32], k: &'a mut [f32], v: &'a mut [f32]) -> Qkv<&'a mut [f32]> {
    Qkv { q, k, v }
}

/// Median over rounds of the seconds per call of `f`.
fn median_seconds(calls_per_round: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..calls_per_round {
                f();
            }
            t.elapsed().as_secs_f64() / calls_per_round as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[ROUNDS / 2]
}

/// The middle value.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn row(name: &str, seconds: f64, rate: String) {
    println!("{name:44} {:>10.1} {rate:>22}", seconds * 1e6);
}

fn per_element(seconds: f64, elements: usize) -> String {
    format!("{:.3} ns/element", seconds * 1e9 / elements as f64)
}

fn main() {
    let mut rng = Rng::new(1);
    let mut random = |n: usize| rng.normal_vec(n, 1.0);
    println!(
        "CPU operations, ViT-B/32 at batch 8, {} threads",
        rayon::current_num_threads()
    );
    println!("{:44} {:>10} {:>22}", "operation", "us/call", "rate");
    on_worker_thread(|| {
        // GELU over the MLP hidden layer.
        let (x, dy) = (random(ROWS * MLP), random(ROWS * MLP));
        let mut y = vec![0f32; ROWS * MLP];
        let n = ROWS * MLP;
        let t = median_seconds(20, || gelu_forward(&mut y, &x, n));
        row("gelu forward (400x3072)", t, per_element(t, n));
        let mut dx = vec![0f32; n];
        // Paired round by round: Φ read off y (the op's body) and evaluated afresh (the body before).
        let (mut from_y, mut afresh) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            from_y.push(median_seconds(5, || gelu_backward(&mut dx, &x, &y, &dy, n)));
            afresh.push(median_seconds(5, || {
                gelu_backward_recomputing(&mut dx, &x, &dy, n)
            }));
        }
        let (t, before) = (median(from_y), median(afresh));
        row("gelu backward (400x3072), Φ = y/x", t, per_element(t, n));
        row(
            "  baseline: Φ evaluated again",
            before,
            format!("{} ({:.2}x)", per_element(before, n), before / t),
        );

        // LayerNorm over the residual stream.
        let (x, dy) = (random(ROWS * WIDTH), random(ROWS * WIDTH));
        let (gamma, beta) = (random(WIDTH), random(WIDTH));
        let (mut y, mut mean, mut rstd) =
            (vec![0f32; ROWS * WIDTH], vec![0f32; ROWS], vec![0f32; ROWS]);
        let t = median_seconds(50, || {
            layernorm_forward(
                Outputs {
                    out: &mut y,
                    mean: &mut mean,
                    rstd: &mut rstd,
                },
                &x,
                Params {
                    gamma: &gamma,
                    beta: &beta,
                },
                Rows::new(ROWS, WIDTH),
                1e-6,
            )
        });
        row(
            "layernorm forward (400x768)",
            t,
            per_element(t, ROWS * WIDTH),
        );
        let (mut dx, mut dgamma, mut dbeta) = (
            vec![0f32; ROWS * WIDTH],
            vec![0f32; WIDTH],
            vec![0f32; WIDTH],
        );
        let t = median_seconds(50, || {
            layernorm_backward(
                Grads {
                    dx: &mut dx,
                    dgamma: &mut dgamma,
                    dbeta: &mut dbeta,
                },
                &dy,
                Saved {
                    x: &x,
                    mean: &mean,
                    rstd: &rstd,
                },
                &gamma,
                Rows::new(ROWS, WIDTH),
            )
        });
        row(
            "layernorm backward (400x768)",
            t,
            per_element(t, ROWS * WIDTH),
        );

        // Attention: 8 images x 12 heads, 50 tokens of 64.
        let (q, k, v, dout) = (
            random(ROWS * WIDTH),
            random(ROWS * WIDTH),
            random(ROWS * WIDTH),
            random(ROWS * WIDTH),
        );
        let vit_b32 = AttentionShape {
            batch: 8,
            tokens: 50,
            heads: HEADS,
            head_dim: WIDTH / HEADS,
        };
        let (mut out, mut probs) = (vec![0f32; ROWS * WIDTH], vec![0f32; 8 * HEADS * 50 * 50]);
        let t = median_seconds(10, || {
            attention_forward(&mut out, &mut probs, qkv(&q, &k, &v), vit_b32)
        });
        row(
            "attention forward (8 x 12 heads, 50 tokens)",
            t,
            per_element(t, 8 * HEADS * 50 * 50),
        );
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; ROWS * WIDTH],
            vec![0f32; ROWS * WIDTH],
            vec![0f32; ROWS * WIDTH],
        );
        let t = median_seconds(10, || {
            attention_backward(
                grads(&mut dq, &mut dk, &mut dv),
                &dout,
                qkv(&q, &k, &v),
                &probs,
                vit_b32,
            )
        });
        row("attention backward", t, per_element(t, 8 * HEADS * 50 * 50));

        // Attention at every ViT shape here: the register tiles (the path
        // above, where the head width allows) against faer's products per
        // head, alternating, in GFLOP/s (4·T²·dh per head forward, twice
        // that backward).
        for (name, batch, t, heads, dh) in [
            ("small32", 64, 65, 4, 16),
            ("vit-demo", 64, 17, 2, 32),
            ("vit-cifar", 64, 65, 3, 64),
            ("vit-b32", 8, 50, 12, 64),
        ] {
            let shape = AttentionShape {
                batch,
                tokens: t,
                heads,
                head_dim: dh,
            };
            let n = shape.len();
            let (q, k, v, dout) = (random(n), random(n), random(n), random(n));
            let (mut out, mut probs) = (vec![0f32; n], vec![0f32; batch * heads * t * t]);
            let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            let flops = 4.0 * (batch * heads * t * t * dh) as f64;
            let rate = |f: f64, s: f64| format!("{:.1} GFLOP/s", f / s / 1e9);
            let (mut tf, mut pf, mut tb, mut pb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..3 {
                tf.push(median_seconds(5, || {
                    attention_forward(&mut out, &mut probs, qkv(&q, &k, &v), shape)
                }));
                pf.push(median_seconds(5, || {
                    products_forward(&mut out, &mut probs, qkv(&q, &k, &v), shape)
                }));
                tb.push(median_seconds(5, || {
                    attention_backward(
                        grads(&mut dq, &mut dk, &mut dv),
                        &dout,
                        qkv(&q, &k, &v),
                        &probs,
                        shape,
                    )
                }));
                pb.push(median_seconds(5, || {
                    products_backward(
                        grads(&mut dq, &mut dk, &mut dv),
                        &dout,
                        qkv(&q, &k, &v),
                        &probs,
                        shape,
                    )
                }));
            }
            let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
            let (tf, pf, tb, pb) = (best(&tf), best(&pf), best(&tb), best(&pb));
            row(
                &format!("attention fwd {name} ({batch}x{heads}x{t}x{dh})"),
                tf,
                rate(flops, tf),
            );
            row(
                "  faer products per head",
                pf,
                format!("{} ({:.2}x)", rate(flops, pf), pf / tf),
            );
            row(&format!("attention bwd {name}"), tb, rate(2.0 * flops, tb));
            row(
                "  faer products per head",
                pb,
                format!("{} ({:.2}x)", rate(2.0 * flops, pb), pb / tb),
            );
        }

        // Residual connection: one pass against copy, then add.
        let be = Cpu;
        let (a, b) = (random(ROWS * WIDTH), random(ROWS * WIDTH));
        let mut sum = vec![0f32; ROWS * WIDTH];
        let len = ROWS * WIDTH;
        let fused = median_seconds(100, || add(&be, &mut sum, &a, &b, len).unwrap());
        let two_pass = median_seconds(100, || {
            be.copy(&mut sum, &a, len).unwrap();
            add_assign(&be, &mut sum, &b, len).unwrap();
        });
        row("residual add (400x768)", fused, per_element(fused, len));
        row(
            "  copy, then add_assign (replaced)",
            two_pass,
            format!("{:.2}x slower", two_pass / fused),
        );

        // x·Wᵀ with twelve distinct weight matrices per round.
        for (layer, inp, out) in [
            ("qkv/proj", WIDTH, WIDTH),
            ("fc1", WIDTH, MLP),
            ("fc2", MLP, WIDTH),
        ] {
            let x = random(ROWS * inp);
            let weights: Vec<Vec<f32>> = (0..12).map(|_| random(out * inp)).collect();
            let mut y = vec![0f32; ROWS * out];
            let t = median_seconds(1, || {
                for w in &weights {
                    // x is [ROWS, inp], w is [out, inp] read transposed, y is [ROWS, out].
                    gemm(
                        1.0,
                        MatRef::from_row_major_slice(&x, ROWS, inp),
                        MatRef::from_row_major_slice(w, out, inp).transpose(),
                        Accumulate::Overwrite,
                        MatMut::from_row_major_slice_mut(&mut y, ROWS, out),
                        rayon::current_num_threads(),
                    );
                }
            }) / 12.0;
            let gflops = 2.0 * (ROWS * inp * out) as f64 / t / 1e9;
            row(
                &format!("x·Wᵀ {layer} ({ROWS}x{inp}x{out}), 12 weights"),
                t,
                format!("{gflops:.0} GFLOP/s"),
            );
        }
    });
}
