//! CPU matrix products on the model's shapes: the engine's `gemm`
//! (faer's matmul) against the `gemm` crate, which it replaced, in the same
//! run, alternating so that machine noise hits both.
//! Prints GFLOP/s (median of rounds) and the ratio. Shapes: every product of
//! the `vit-cifar` batch-64 training step (rows = 64 × 65 tokens) and of the
//! `vit-b32` batch-8 forward (rows = 8 × 50), in the layouts the model uses:
//! `x·Wᵀ` (forward), `dy·W` (input gradient) and `dyᵀ·x` (weight gradient).
//!
//!     cargo bench --bench cpu_gemm
//!
//! Threads: every core unless RAYON_NUM_THREADS says otherwise.

use effrank_engine::ops::matmul::cpu::gemm as engine_gemm;
use effrank_engine::ops::matmul::Accumulate;
use effrank_engine::rng::Rng;
use faer::{MatMut, MatRef};
use std::time::Instant;

#[derive(Clone, Copy)]
enum Layout {
    /// y[rows, out] = x[rows, in] · W[out, in]ᵀ
    Forward,
    /// dx[rows, in] = dy[rows, out] · W[out, in]
    InputGrad,
    /// dW[out, in] += dy[rows, out]ᵀ · x[rows, in]
    WeightGrad,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Forward => "fwd",
            Layout::InputGrad => "dx",
            Layout::WeightGrad => "dW",
        }
    }
}

/// (model, layer, rows, in, out, the products timed).
type Layer = (
    &'static str,
    &'static str,
    usize,
    usize,
    usize,
    &'static [Layout],
);

/// (m, k, n, strides of A, strides of B, accumulate) of one layer product.
fn problem(
    layout: Layout,
    rows: usize,
    inp: usize,
    out: usize,
) -> (usize, usize, usize, (isize, isize), (isize, isize), bool) {
    match layout {
        Layout::Forward => (rows, inp, out, (inp as isize, 1), (1, inp as isize), false),
        Layout::InputGrad => (rows, out, inp, (out as isize, 1), (inp as isize, 1), false),
        Layout::WeightGrad => (out, rows, inp, (1, out as isize), (inp as isize, 1), true),
    }
}

fn main() {
    let threads = rayon::current_num_threads();
    println!("CPU GEMM, {threads} threads, GFLOP/s (median of 7 rounds, alternating)");
    println!(
        "{:<40} {:>9} {:>9} {:>7}",
        "product (m x k x n)", "engine", "gemm", "ratio"
    );
    // The training step needs all three products of each layer, the forward
    // only x·Wᵀ.
    const ALL: &[Layout] = &[Layout::Forward, Layout::InputGrad, Layout::WeightGrad];
    let layers: [Layer; 6] = [
        ("vit-cifar", "qkv/proj", 4160, 192, 192, ALL),
        ("vit-cifar", "fc1", 4160, 192, 768, ALL),
        ("vit-cifar", "fc2", 4160, 768, 192, ALL),
        ("vit-b32", "qkv/proj", 400, 768, 768, &[Layout::Forward]),
        ("vit-b32", "fc1", 400, 768, 3072, &[Layout::Forward]),
        ("vit-b32", "fc2", 400, 3072, 768, &[Layout::Forward]),
    ];
    let cases = layers
        .iter()
        .flat_map(|&(model, layer, rows, inp, out, layouts)| {
            layouts.iter().map(move |&layout| {
                (
                    format!("{model} {layer} {}", layout.name()),
                    layout,
                    rows,
                    inp,
                    out,
                )
            })
        });
    let mut rng = Rng::new(3);
    let (mut total_engine, mut total_baseline) = (0.0, 0.0);
    for (name, layout, rows, inp, out) in cases {
        let (m, k, n, (rsa, csa), (rsb, csb), accumulate) = problem(layout, rows, inp, out);
        let a = rng.normal_vec(m * k, 1.0);
        let b = rng.normal_vec(k * n, 1.0);
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let reps = ((2e9 / flops) as usize).max(1);
        let time = |baseline: bool, c: &mut [f32]| {
            let t0 = Instant::now();
            for _ in 0..reps {
                // SAFETY: the strides describe `a`, `b` and `c` exactly.
                unsafe {
                    if baseline {
                        let par = if threads > 1 {
                            gemm::Parallelism::Rayon(threads)
                        } else {
                            gemm::Parallelism::None
                        };
                        gemm::gemm(
                            m,
                            n,
                            k,
                            c.as_mut_ptr(),
                            1,
                            n as isize,
                            accumulate,
                            a.as_ptr(),
                            csa,
                            rsa,
                            b.as_ptr(),
                            csb,
                            rsb,
                            1.0f32,
                            1.0f32,
                            false,
                            false,
                            false,
                            par,
                        );
                    } else {
                        engine_gemm(
                            1.0,
                            MatRef::from_raw_parts(a.as_ptr(), m, k, rsa, csa),
                            MatRef::from_raw_parts(b.as_ptr(), k, n, rsb, csb),
                            if accumulate {
                                Accumulate::Add
                            } else {
                                Accumulate::Overwrite
                            },
                            MatMut::from_row_major_slice_mut(&mut c[..m * n], m, n),
                            threads,
                        );
                    }
                }
            }
            flops * reps as f64 / t0.elapsed().as_secs_f64() / 1e9
        };
        time(false, &mut c);
        time(true, &mut c);
        let (mut engine, mut baseline) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            engine.push(time(false, &mut c));
            baseline.push(time(true, &mut c));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|x, y| x.total_cmp(y));
            v[v.len() / 2]
        };
        let (e, g) = (median(&mut engine), median(&mut baseline));
        total_engine += flops / e;
        total_baseline += flops / g;
        println!(
            "{:<40} {:>9.0} {:>9.0} {:>6.2}x",
            format!("{name} ({m}x{k}x{n})"),
            e,
            g,
            e / g
        );
    }
    println!(
        "all shapes, one call each: engine {:.2}x the speed of the gemm crate",
        total_baseline / total_engine
    );
}
