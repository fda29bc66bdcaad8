//! The analysis against SciPy (tests/data/pchip_golden.json, written by
//! scripts/pchip_golden.py), brute force and dense evaluation; bad input;
//! results folders; weight spectra; and the adaptive sweep's saving over a
//! fixed grid on a synthetic accuracy curve.

use effrank_engine::analysis::knee::knee;
use effrank_engine::analysis::region::crossing;
use effrank_engine::analysis::report::analyze;
use effrank_engine::analysis::spectrum::weight_spectra;
use effrank_engine::analysis::{
    analyze_folder, analyze_labelled, read_measurements, suggest_ranks, AnalysisOptions, KneeAxis,
    Labelled, Pchip,
};
use effrank_engine::results::{append_record, Record, StudentRecord, TeacherRecord};
use effrank_engine::rng::Rng;
use serde_json::Value;
use std::path::Path;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn pchip_matches_scipy_golden_values_derivatives_and_crossings() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pchip_golden.json"),
    )
    .unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 100);
    let (mut values, mut crossings) = (0, 0);
    for (ci, c) in cases.iter().enumerate() {
        let (x, y) = (floats(&c["x"]), floats(&c["y"]));
        let p = Pchip::new(&x, &y).unwrap();
        for ((q, v), d) in floats(&c["query"])
            .iter()
            .zip(floats(&c["value"]))
            .zip(floats(&c["derivative"]))
        {
            assert!(
                close(p.value(*q), v),
                "case {ci} ({}): value at {q}: {} vs SciPy {v}",
                c["kind"],
                p.value(*q)
            );
            assert!(
                close(p.derivative(*q), d),
                "case {ci} ({}): derivative at {q}: {} vs SciPy {d}",
                c["kind"],
                p.derivative(*q)
            );
            values += 1;
        }
        for cr in c["crossings"].as_array().unwrap() {
            let level = cr["level"].as_f64().unwrap();
            let ours = p.first_reaching(level);
            match cr["x"].as_f64() {
                Some(want) => assert!(
                    ours.is_some_and(|o| close(o, want)),
                    "case {ci}: crossing of {level}: {ours:?} vs SciPy {want}"
                ),
                None => assert!(
                    ours.is_none(),
                    "case {ci}: crossing of {level}: {ours:?}, SciPy finds none"
                ),
            }
            crossings += 1;
        }
    }
    println!(
        "{values} values and derivatives, {crossings} crossings match SciPy {}",
        golden["scipy"]
    );
}

fn random_curve(rng: &mut Rng, n: usize, monotone: bool) -> (Vec<f64>, Vec<f64>) {
    let mut x = vec![1.0 + (rng.uniform() * 3.0).floor()];
    while x.len() < n {
        x.push(x[x.len() - 1] + 1.0 + (rng.uniform() * 40.0).floor());
    }
    let mut y = Vec::new();
    let mut acc = 0.0;
    for _ in 0..n {
        acc = if monotone {
            acc + rng.uniform()
        } else {
            rng.uniform()
        };
        y.push(acc);
    }
    (x, y)
}

#[test]
fn knee_is_the_brute_force_maximum_distance_on_both_axes() {
    let mut rng = Rng::new(7);
    for trial in 0..200 {
        let (x, y) = random_curve(&mut rng, 3 + trial % 8, trial % 2 == 0);
        let p = Pchip::new(&x, &y).unwrap();
        for axis in [KneeAxis::Linear, KneeAxis::Log2] {
            let f = |r: f64| if axis == KneeAxis::Log2 { r.log2() } else { r };
            let (r0, r1) = (x[0], x[x.len() - 1]);
            let (a, b) = ((f(r0), p.value(r0)), (f(r1), p.value(r1)));
            let dist = |r: usize| {
                let (px, py) = (f(r as f64), p.value(r as f64));
                // Distance to the line through a and b, via the triangle area.
                ((b.0 - a.0) * (a.1 - py) - (a.0 - px) * (b.1 - a.1)).abs()
                    / ((b.0 - a.0).hypot(b.1 - a.1))
            };
            let ranks: Vec<usize> = (r0 as usize..=r1 as usize).collect();
            let best = ranks.iter().map(|&r| dist(r)).fold(f64::MIN, f64::max);
            let k = knee(&p, axis).unwrap();
            assert!(
                (dist(k.rank) - best).abs() <= 1e-12 * best.max(1e-300),
                "trial {trial} {axis:?}: knee {} at {} vs best {best}",
                k.rank,
                dist(k.rank)
            );
            let first_best = ranks
                .iter()
                .find(|&&r| (dist(r) - best).abs() <= 1e-12 * best.max(1e-300))
                .unwrap();
            assert_eq!(k.rank, *first_best, "ties go to the smaller rank");
        }
    }
}

#[test]
fn log2_axis_moves_the_knee_left_on_a_saturating_curve() {
    let x: Vec<f64> = [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0].to_vec();
    let y: Vec<f64> = x
        .iter()
        .map(|r: &f64| 1.0 / (1.0 + (-(r.log2() - 3.5) * 1.5).exp()))
        .collect();
    let p = Pchip::new(&x, &y).unwrap();
    let (lin, log) = (
        knee(&p, KneeAxis::Linear).unwrap().rank,
        knee(&p, KneeAxis::Log2).unwrap().rank,
    );
    assert!(
        log < lin,
        "log2 knee {log} should lie left of the linear knee {lin}"
    );
}

#[test]
fn region_matches_dense_evaluation() {
    let mut rng = Rng::new(11);
    for trial in 0..200 {
        let (x, y) = random_curve(&mut rng, 2 + trial % 9, trial % 3 != 0);
        let p = Pchip::new(&x, &y).unwrap();
        let reference = y.iter().copied().fold(f64::MIN, f64::max) * (0.9 + 0.2 * rng.uniform());
        for frac in [0.3, 0.85, 0.95] {
            let c = crossing(&p, frac, reference);
            let level = frac * reference;
            let dense_int =
                (x[0] as usize..=x[x.len() - 1] as usize).find(|&r| p.value(r as f64) >= level);
            assert_eq!(c.rank, dense_int, "trial {trial}: integer crossing");
            let steps = 20_000;
            let h = (x[x.len() - 1] - x[0]) / steps as f64;
            let dense_real = (0..=steps)
                .map(|i| x[0] + i as f64 * h)
                .find(|&t| p.value(t) >= level);
            match (c.exact, dense_real) {
                (Some(e), Some(d)) => {
                    assert!(
                        e <= d + 1e-9 && d - e <= h + 1e-9,
                        "trial {trial}: exact {e} vs dense {d}"
                    );
                    assert!(e == x[0] || (p.value(e) - level).abs() <= 1e-9 * level.abs().max(1.0));
                }
                (None, None) => assert!(c.note.contains("never reaches")),
                other => panic!("trial {trial}: exact vs dense disagree: {other:?}"),
            }
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn err_of(path: &Path) -> String {
    format!("{:#}", read_measurements(path).unwrap_err())
}

#[test]
fn bad_input_is_an_error_naming_the_problem() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    assert!(err_of(&write(dir, "one.csv", "rank,accuracy\n4,0.5\n")).contains("at least two"));
    assert!(err_of(&write(dir, "nan.csv", "rank,accuracy\n4,0.5\n8,NaN\n")).contains("line 3"));
    assert!(
        err_of(&write(dir, "zero.csv", "rank,accuracy\n0,0.5\n8,0.6\n"))
            .contains("must be positive")
    );
    assert!(err_of(&write(dir, "neg.csv", "4,0.5\n-8,0.6\n")).contains("line 2"));
    let dup = err_of(&write(
        dir,
        "dup.csv",
        "rank,accuracy\n4,0.5\n8,0.6\n4,0.55\n",
    ));
    assert!(
        dup.contains("line 4") && dup.contains("line 2") && dup.contains("seed"),
        "{dup}"
    );
    assert!(err_of(&write(
        dir,
        "bad.csv",
        "rank,accuracy\n4,0.5\n8,zero point six\n"
    ))
    .contains("line 3"));
    let jsonl = write(dir, "results-bad.jsonl", "{\"kind\":\"teacher\",\"top1\":0.7,\"top5\":0.9,\"params\":100}\nnot json\n{\"kind\":\"teacher\",\"top1\":0.7,\"top5\":0.9,\"params\":100}\n");
    assert!(err_of(&jsonl).contains("line 2"));
    assert!(err_of(&dir.join("missing")).contains("no such"));
}

#[test]
fn csv_is_sorted_and_seeds_allow_repeated_ranks() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "pts.csv",
        "32,0.9,1\n2,0.2,1\n8,0.6,1\n2,0.3,2\n8,0.5,2\n32,0.8,2\n",
    );
    let m = read_measurements(&p).unwrap();
    let ranks: Vec<usize> = m.points.iter().map(|p| p.rank).collect();
    assert_eq!(ranks, vec![2, 2, 8, 8, 32, 32]);
    assert_eq!(
        m.mean_curve(),
        vec![(2.0, 0.25), (8.0, 0.55), (32.0, 0.850_000_000_000_000_1)]
    );
    let opts = AnalysisOptions {
        teacher_acc: Some(1.0),
        plot: false,
        ..Default::default()
    };
    let r = analyze(&m, &opts, None).unwrap();
    assert_eq!(r.seeds.len(), 2);
    let sp = r.spread.unwrap();
    assert_eq!(sp.seeds, 2);
    assert!(sp.r_lo.is_some_and(|s| s.min >= 8.0 && s.max <= 32.0));
    // No teacher accuracy and --reference teacher: a plain error.
    let err = format!(
        "{:#}",
        analyze(&m, &AnalysisOptions::default(), None).unwrap_err()
    );
    assert!(err.contains("--teacher-acc"), "{err}");
}

fn student(rank: usize, seed: u64, top1: f64) -> Record {
    Record::Student(StudentRecord {
        rank,
        seed,
        top1,
        top5: top1,
        params: 1000 + 50 * rank,
        teacher_params: 20_000,
        compression: 20_000.0 / (1000 + 50 * rank) as f64,
        epochs: 1,
        wall_s: 1.0,
        host: "test".into(),
        settings: Value::Null,
        resumed_from_epoch: 0,
        allocation: None,
        ranks: None,
    })
}

#[test]
fn results_folder_keeps_first_duplicates_and_writes_every_output() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("results-shard0of2.jsonl");
    let b = d.path().join("results-shard1of2.jsonl");
    append_record(
        &a,
        &Record::Teacher(TeacherRecord {
            top1: 0.8,
            top5: 0.95,
            params: 20_000,
        }),
    )
    .unwrap();
    append_record(
        &b,
        &Record::Teacher(TeacherRecord {
            top1: 0.5,
            top5: 0.9,
            params: 1,
        }),
    )
    .unwrap();
    for (r, acc) in [(2, 0.2), (8, 0.6), (16, 0.7), (32, 0.76), (64, 0.79)] {
        append_record(&a, &student(r, 0, acc)).unwrap();
    }
    append_record(&b, &student(8, 0, 0.01)).unwrap();
    let report = analyze_folder(d.path(), &AnalysisOptions::default()).unwrap();
    assert_eq!(report.teacher_acc, Some(0.8));
    assert_eq!(report.mean.points[1], (8.0, 0.6));
    let fit = report.params_fit.unwrap();
    assert_eq!((fit.a, fit.b), (1000.0, 50.0));
    let lo = report
        .compression
        .iter()
        .find(|c| c.what == "r_lo")
        .unwrap();
    assert!((lo.compression - 20_000.0 / (1000.0 + 50.0 * lo.rank as f64)).abs() < 1e-12);
    for f in ["analysis.json", "summary.md", "plot.png"] {
        assert!(d.path().join(f).metadata().unwrap().len() > 100, "{f}");
    }
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("analysis.json")).unwrap())
            .unwrap();
    assert_eq!(
        json["mean"]["lo"]["rank"].as_u64(),
        report.mean.lo.rank.map(|r| r as u64)
    );
    assert!(report.terminal_summary().contains("r at  85%"));
    // One results file alone.
    let m = read_measurements(&a).unwrap();
    assert_eq!(m.points.len(), 5);
}

/// Both normalizations: the teacher's accuracy (0.8) and the curve's
/// maximum (0.79, the largest measured point) give the crossings of their
/// own levels, whichever the headline uses.
#[test]
fn the_region_is_reported_against_both_normalizations() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("results.jsonl");
    append_record(
        &f,
        &Record::Teacher(TeacherRecord {
            top1: 0.8,
            top5: 0.95,
            params: 20_000,
        }),
    )
    .unwrap();
    for (r, acc) in [(2, 0.2), (8, 0.6), (16, 0.7), (32, 0.76), (64, 0.79)] {
        append_record(&f, &student(r, 0, acc)).unwrap();
    }
    let m = read_measurements(d.path()).unwrap();
    let report = analyze(&m, &AnalysisOptions::default(), None).unwrap();
    let refs: Vec<(String, f64)> = report
        .by_reference
        .iter()
        .map(|b| (format!("{:?}", b.reference), b.reference_acc))
        .collect();
    assert_eq!(
        refs,
        [("Teacher".to_string(), 0.8), ("Max".to_string(), 0.79)]
    );
    let p = Pchip::new(&[2.0, 8.0, 16.0, 32.0, 64.0], &[0.2, 0.6, 0.7, 0.76, 0.79]).unwrap();
    for b in &report.by_reference {
        assert_eq!(b.hi.rank, crossing(&p, 0.95, b.reference_acc).rank);
    }
    assert_eq!(
        report.by_reference[0].hi.rank, report.mean.hi.rank,
        "the headline is the teacher's"
    );
    assert!(
        report.summary_md().contains("| curve maximum | 0.7900 |"),
        "{}",
        report.summary_md()
    );
    assert!(report
        .terminal_summary()
        .contains("against the curve maximum 0.7900"));
    // Without a teacher record only the curve's maximum can be computed.
    let no_teacher = analyze(
        &m,
        &AnalysisOptions {
            reference: effrank_engine::analysis::Reference::Max,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    assert_eq!(no_teacher.by_reference.len(), 2);
    let csv = write(d.path(), "p.csv", "rank,accuracy\n2,0.2\n8,0.6\n64,0.79\n");
    let m = read_measurements(&csv).unwrap();
    let r = analyze(
        &m,
        &AnalysisOptions {
            reference: effrank_engine::analysis::Reference::Max,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    assert_eq!(r.by_reference.len(), 1);
}

/// Two labelled folders: one analysis.json with both curves in the order
/// given, each the single-curve analysis; one table; labels must differ.
#[test]
fn labelled_folders_are_analyzed_together() {
    let d = tempfile::tempdir().unwrap();
    let mut inputs = Vec::new();
    for (label, scale) in [("attn", 1.0), ("mlp", 0.9)] {
        let dir = d.path().join(label);
        let f = dir.join("results.jsonl");
        append_record(
            &f,
            &Record::Teacher(TeacherRecord {
                top1: 0.8,
                top5: 0.95,
                params: 20_000,
            }),
        )
        .unwrap();
        for (r, acc) in [(2, 0.2), (8, 0.6), (16, 0.7), (64, 0.79)] {
            append_record(&f, &student(r, 0, acc * scale)).unwrap();
        }
        inputs.push(Labelled {
            label: label.into(),
            path: dir,
        });
    }
    let out = d.path().join("joint");
    let report = analyze_labelled(
        &inputs,
        &out,
        &AnalysisOptions {
            plot: false,
            ..Default::default()
        },
    )
    .unwrap();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("analysis.json")).unwrap()).unwrap();
    assert_eq!(json["curves"][0]["label"], "attn");
    assert_eq!(
        json["curves"][1]["mean"]["points"][0][1].as_f64(),
        Some(0.2 * 0.9)
    );
    assert_eq!(
        json["curves"][1]["params_fit"]["b"].as_f64(),
        Some(50.0),
        "parameter counts per curve"
    );
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.contains("| attn |") && md.contains("| mlp |") && md.contains("| rank | attn | mlp |"),
        "{md}"
    );
    assert!(report.terminal_summary().contains("2 curves"));
    inputs[1].label = "attn".into();
    let e = analyze_labelled(&inputs, &out, &AnalysisOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("two curves are labelled 'attn'"), "{e}");
}

#[test]
fn weight_spectra_of_fused_qkv_and_low_rank_layers() {
    use effrank_engine::model::checkpoint::save_checkpoint;
    use effrank_engine::model::params::{dense_ranks, BlockLinear, Linear};
    use effrank_engine::model::{VitConfig, VitParams};
    use std::collections::BTreeMap;
    let d = tempfile::tempdir().unwrap();
    // Width 2, MLP 4, one block: q = diag(3, 1), k = I, v = 0 (dense, so
    // fused as qkv on disk); fc1 = U V with U = [1, 0, 0, 2]ᵀ, V = [1, 1].
    let cfg = VitConfig {
        image_size: 4,
        channels: 3,
        patch: 2,
        width: 2,
        depth: 1,
        heads: 1,
        mlp: 4,
        classes: 2,
        ln_eps: 1e-6,
        family: Default::default(),
    };
    let mut ranks = dense_ranks(&cfg);
    ranks[0][BlockLinear::Fc1] = Some(1);
    let mut p: VitParams<Vec<f32>> =
        VitParams::build(&cfg, &ranks, |s| Ok::<_, ()>(vec![0.5; s.numel()])).unwrap();
    let dense = |w: Vec<f32>| Linear::Dense {
        weight: w,
        bias: Some(vec![0.0; 2]),
    };
    p.blocks[0].q = dense(vec![3.0, 0.0, 0.0, 1.0]);
    p.blocks[0].k = dense(vec![1.0, 0.0, 0.0, 1.0]);
    p.blocks[0].v = dense(vec![0.0; 4]);
    p.blocks[0].fc1 = Linear::LowRank {
        u: vec![1.0, 0.0, 0.0, 2.0],
        v: vec![1.0, 1.0],
        bias: Some(vec![0.0; 4]),
    };
    let path = d.path().join("m.safetensors");
    save_checkpoint(&path, &cfg, &ranks, &p, &BTreeMap::new()).unwrap();
    let s = weight_spectra(&path).unwrap();
    let names: Vec<&str> = s.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "blocks.0.attn.q",
            "blocks.0.attn.k",
            "blocks.0.attn.v",
            "blocks.0.attn.proj",
            "blocks.0.mlp.fc1",
            "blocks.0.mlp.fc2"
        ]
    );
    let q = &s.layers[0];
    assert!((q.singular_values[0] - 3.0).abs() < 1e-6 && (q.singular_values[1] - 1.0).abs() < 1e-6);
    let h: f64 = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
    assert!((q.entropy_rank - h.exp()).abs() < 1e-6);
    assert!((q.stable_rank - 10.0 / 9.0).abs() < 1e-6);
    assert_eq!((q.rank_90, q.rank_95, q.rank_99), (1, 2, 2));
    assert!((s.layers[1].entropy_rank - 2.0).abs() < 1e-6);
    assert_eq!(s.layers[2].entropy_rank, 0.0);
    let fc1 = &s.layers[4];
    assert_eq!(
        (fc1.shape, fc1.stored_rank, fc1.singular_values.len()),
        ([4, 2], Some(1), 1)
    );
    assert!((fc1.singular_values[0] - 10.0f64.sqrt()).abs() < 1e-5);
    assert!((fc1.stable_rank - 1.0).abs() < 1e-9);
}

/// `analyze --spectrum` reads what `eval` reads: the same tiny weights under
/// timm, torchvision and Hugging Face names give the same spectra.
#[test]
fn weight_spectra_of_every_importable_naming_agree() {
    let file = |name: &str| {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    };
    let timm = weight_spectra(&file("timm_tiny.safetensors")).unwrap();
    assert_eq!(timm.layers.len(), 12, "two blocks of six layers");
    for other in ["torchvision_tiny.safetensors", "hf_tiny.safetensors"] {
        let s = weight_spectra(&file(other)).unwrap_or_else(|e| panic!("{other}: {e:#}"));
        assert_eq!(s.layers.len(), timm.layers.len(), "{other}");
        for (a, b) in s.layers.iter().zip(&timm.layers) {
            assert_eq!(a.name, b.name, "{other}");
            for (x, y) in a.singular_values.iter().zip(&b.singular_values) {
                assert!(
                    (x - y).abs() <= 1e-6 * y.abs().max(1.0),
                    "{other} {}: {x} vs {y}",
                    a.name
                );
            }
        }
    }
}

/// Accuracy of a synthetic student: logistic in log2(r), shaped like
/// METHOD.md's reference (85% of the teacher near r = 16, 95% near r = 34).
fn synthetic_acc(r: f64, teacher: f64) -> f64 {
    // a / (1 + exp(-k (log2 r - x0))) through (16, 0.85) and (34, 0.95), a = 0.98.
    let a = 0.98;
    let (g16, g34) = ((a / 0.85 - 1.0f64).ln(), (a / 0.95 - 1.0f64).ln());
    let k = (g16 - g34) / (34.0f64.log2() - 4.0);
    let x0 = 4.0 + g16 / k;
    teacher * a / (1.0 + (-k * (r.log2() - x0)).exp())
}

/// Measured ranks bracketing the true integer crossing within ±1?
fn pinned(ranks: &[usize], level: f64, teacher: f64) -> bool {
    let truth = (1..=256)
        .find(|&r| synthetic_acc(r as f64, teacher) >= level)
        .unwrap();
    let below = ranks.iter().filter(|&&r| r < truth).max();
    let above = ranks.iter().filter(|&&r| r >= truth).min();
    matches!((below, above), (Some(&a), Some(&b)) if b - a <= 2)
}

#[test]
fn adaptive_sweep_pins_the_region_with_fewer_trainings_than_a_grid() {
    let teacher = 0.7335;
    let opts = AnalysisOptions::default();
    let levels = [opts.lo * teacher, opts.hi * teacher];
    let mut ranks = vec![2, 8, 32, 128, 256];
    let mut rounds = 0;
    let mut pinned_after = None;
    loop {
        let points: Vec<(f64, f64)> = ranks
            .iter()
            .map(|&r| (r as f64, synthetic_acc(r as f64, teacher)))
            .collect();
        if pinned_after.is_none() && levels.iter().all(|&l| pinned(&ranks, l, teacher)) {
            pinned_after = Some(ranks.len());
        }
        let next = suggest_ranks(&points, teacher, &opts, 2, 1, 256);
        if next.is_empty() {
            break;
        }
        assert!(
            next.iter().all(|r| !ranks.contains(r)),
            "suggested a measured rank: {next:?}"
        );
        ranks.extend(next);
        rounds += 1;
        assert!(rounds < 40, "adaptive loop does not converge: {ranks:?}");
    }
    let region_trainings =
        pinned_after.expect("adaptive suggestions stopped before pinning the region");
    assert!(levels.iter().all(|&l| pinned(&ranks, l, teacher)));
    let grid = [
        2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 64, 96, 128, 192, 256,
    ];
    let grid_pinned: Vec<bool> = levels.iter().map(|&l| pinned(&grid, l, teacher)).collect();
    ranks.sort();
    println!(
        "adaptive: r_lo and r_hi pinned to ±1 after {region_trainings} trainings; suggestions stop after {} ({rounds} rounds of 2), ranks {ranks:?}; fixed 16-rank grid {grid:?}: 16 trainings, r_lo pinned {}, r_hi pinned {}",
        ranks.len(),
        grid_pinned[0],
        grid_pinned[1]
    );
    assert!(
        region_trainings < grid.len(),
        "adaptive needed {region_trainings} trainings, the grid 16"
    );
}
