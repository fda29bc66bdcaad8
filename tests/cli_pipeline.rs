//! End-to-end tests of the command line on the built-in demo data (small):
//! a teacher learns, a sweep writes results, resumes, shards agree with a
//! single run, and bad input gives errors that name what is wrong.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");
/// Small demo data: 800 training and 200 test images.
const DEMO: [&str; 4] = ["--data", "demo", "--demo-images", "800"];

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("the binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "effrank-engine {args:?} failed:\n{text}"
    );
    text
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "effrank-engine {args:?} should have failed:\n{text}"
    );
    assert!(
        !text.contains("panicked"),
        "a panic instead of an error:\n{text}"
    );
    text
}

/// A teacher shared by the tests (trained once per test process).
fn teacher() -> &'static Path {
    static T: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("teacher");
        let mut args = vec![
            "train", "--model", "vit-demo", "--epochs", "4", "--lr", "2e-3", "--device", "cpu",
            "--quiet", "--out",
        ];
        args.push(out.to_str().unwrap());
        args.extend(DEMO);
        ok(&args);
        let ckpt = out.join("model.safetensors");
        (dir, ckpt)
    });
    path
}

/// (rank, seed, top-1) of every student record in a results folder.
fn results(dir: &Path) -> Vec<(u64, u64, f64)> {
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !(name.starts_with("results") && name.ends_with(".jsonl")) {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["kind"] == "student" {
                rows.push((
                    v["rank"].as_u64().unwrap(),
                    v["seed"].as_u64().unwrap(),
                    v["top1"].as_f64().unwrap(),
                ));
            }
        }
    }
    rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rows
}

fn sweep_args<'a>(teacher: &'a str, out: &'a str, ranks: &'a str) -> Vec<&'a str> {
    let mut a = vec![
        "sweep",
        "--teacher",
        teacher,
        "--ranks",
        ranks,
        "--epochs",
        "1",
        "--lr",
        "2e-3",
        "--device",
        "cpu",
        "--quiet",
        "--no-analyze",
        "--out",
        out,
    ];
    a.extend(DEMO);
    a
}

#[test]
fn a_micro_teacher_learns_well_above_chance() {
    let metrics = std::fs::read_to_string(teacher().with_file_name("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let top1 = last["test_top1"].as_f64().unwrap();
    // 10 classes: chance is 10%.
    assert!(top1 > 0.3, "teacher test top-1 {top1}");
    assert_eq!(metrics.lines().count(), 4);
    for key in ["loss", "train_top1", "images_per_s"] {
        assert!(
            last[key].as_f64().is_some(),
            "metrics line lacks {key}: {last}"
        );
    }
}

#[test]
fn a_sweep_writes_results_and_resumes_without_redoing_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let (t, out) = (teacher().to_str().unwrap(), dir.path().to_str().unwrap());
    ok(&sweep_args(t, out, "1,4,16"));
    let first = results(dir.path());
    assert_eq!(
        first.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![1, 4, 16]
    );
    assert!(first.iter().all(|r| (0.0..=1.0).contains(&r.2)));
    let text = ok(&{
        let mut a = sweep_args(t, out, "1,4,16,32");
        a.retain(|x| *x != "--quiet");
        a
    });
    assert!(
        text.contains("3 of 4 jobs of this shard already finished"),
        "{text}"
    );
    let second = results(dir.path());
    assert_eq!(second.len(), 4);
    assert_eq!(&second[..2], &first[..2]);
}

#[test]
fn two_shards_together_equal_one_run() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let t = teacher().to_str().unwrap();
    ok(&sweep_args(t, one.path().to_str().unwrap(), "2,8,32"));
    for shard in ["0/2", "1/2"] {
        let mut a = sweep_args(t, two.path().to_str().unwrap(), "2,8,32");
        a.extend(["--shard", shard]);
        ok(&a);
    }
    assert_eq!(results(one.path()), results(two.path()));
    assert!(
        two.path().join("results-shard0of2.jsonl").exists()
            && two.path().join("results-shard1of2.jsonl").exists()
    );
}

#[test]
fn an_interrupted_rank_resumes_from_its_last_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (t, out) = (teacher().to_str().unwrap(), dir.path().to_str().unwrap());
    let mut args = sweep_args(t, out, "8");
    let epochs = args.iter().position(|a| *a == "--epochs").unwrap();
    args[epochs + 1] = "3";
    args.retain(|x| *x != "--quiet");
    let mut child = Command::new(BIN)
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The training state is written last at the end of an epoch (its commit point).
    let state = dir.path().join("runs/r8-s0/state.safetensors");
    let start = std::time::Instant::now();
    while !state.exists() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(state.exists(), "the rank never finished an epoch");
    let text = ok(&args);
    assert!(text.contains("resuming after epoch"), "{text}");
    let again = tempfile::tempdir().unwrap();
    let mut fresh = args.clone();
    let o = fresh.iter().position(|a| *a == "--out").unwrap();
    fresh[o + 1] = again.path().to_str().unwrap();
    ok(&fresh);
    assert_eq!(
        results(dir.path()),
        results(again.path()),
        "a resumed rank must equal an uninterrupted one"
    );
}

#[test]
fn factorize_prints_the_table_and_eval_reads_the_student() {
    let dir = tempfile::tempdir().unwrap();
    let student = dir.path().join("s.safetensors");
    let text = ok(&[
        "factorize",
        "--teacher",
        teacher().to_str().unwrap(),
        "--rank",
        "8",
        "--out",
        student.to_str().unwrap(),
    ]);
    assert!(
        text.contains("blocks.1.mlp.fc2") && text.contains("compression"),
        "{text}"
    );
    let logits = dir.path().join("logits.safetensors");
    let mut args = vec![
        "eval",
        "--checkpoint",
        student.to_str().unwrap(),
        "--device",
        "cpu",
        "--dump-logits",
        logits.to_str().unwrap(),
    ];
    args.extend(DEMO);
    let text = ok(&args);
    assert!(text.contains("top-1") && logits.exists(), "{text}");
}

#[test]
fn distill_trains_a_student_from_a_rank() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "distill",
        "--teacher",
        teacher().to_str().unwrap(),
        "--rank",
        "4",
        "--loss",
        "kd=1,feature=0.5",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        dir.path().to_str().unwrap(),
    ];
    args.extend(DEMO);
    let text = ok(&args);
    assert!(text.contains("student: test top-1"), "{text}");
    assert!(dir.path().join("model.safetensors").exists());
}

#[test]
fn bad_input_gives_errors_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher().to_str().unwrap();
    let out = dir.path().to_str().unwrap();
    // Rank out of range names the layer and its shape.
    let e = fails(&sweep_args(t, out, "1,65"));
    assert!(e.contains("rank 65") && e.contains("[64, 64]"), "{e}");
    // Missing and corrupt checkpoints name the file.
    let e = fails(&[
        "factorize",
        "--teacher",
        "/nonexistent/t.safetensors",
        "--rank",
        "2",
    ]);
    assert!(e.contains("/nonexistent/t.safetensors"), "{e}");
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a checkpoint").unwrap();
    let e = fails(&[
        "factorize",
        "--teacher",
        bad.to_str().unwrap(),
        "--rank",
        "2",
    ]);
    assert!(e.contains("bad.safetensors"), "{e}");
    // A truncated CIFAR file names the file and its size.
    let cifar = dir.path().join("cifar");
    std::fs::create_dir_all(&cifar).unwrap();
    std::fs::write(cifar.join("train.bin"), vec![0u8; 3074 * 2 + 5]).unwrap();
    std::fs::write(cifar.join("test.bin"), vec![0u8; 3074]).unwrap();
    let e = fails(&[
        "eval",
        "--checkpoint",
        t,
        "--data",
        cifar.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("train.bin") && e.contains("6153"), "{e}");
    // A checkpoint holding NaN names the tensor.
    let mut ck = effrank_engine::model::checkpoint::load_checkpoint(teacher()).unwrap();
    ck.params.head.bias_mut().unwrap()[3] = f32::NAN;
    let nan = dir.path().join("nan.safetensors");
    effrank_engine::model::checkpoint::save_checkpoint(
        &nan,
        &ck.cfg,
        &ck.ranks,
        &ck.params,
        &ck.metadata,
    )
    .unwrap();
    let e = fails(&[
        "factorize",
        "--teacher",
        nan.to_str().unwrap(),
        "--rank",
        "2",
    ]);
    assert!(e.contains("head.bias") && e.contains("NaN"), "{e}");
    // Bad flags.
    let mut a = sweep_args(t, out, "2");
    a.extend(["--shard", "2/2"]);
    assert!(fails(&a).contains("--shard"));
    let mut a = sweep_args(t, out, "2");
    a.extend(["--loss", "mse"]);
    assert!(fails(&a).contains("unknown loss 'mse'"));
    // No GPU here: --device cuda is an error, not a panic (when none is usable).
    if std::env::var("EFFRANK_TEST_HAS_GPU").is_err() {
        let mut a = vec!["eval", "--checkpoint", t, "--device", "cuda"];
        a.extend(DEMO);
        let e = fails(&a);
        assert!(e.to_lowercase().contains("cuda"), "{e}");
    }
}

#[test]
fn cached_teacher_logits_give_the_same_students_as_a_live_teacher() {
    let (cached, live) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let t = teacher().to_str().unwrap();
    ok(&sweep_args(t, cached.path().to_str().unwrap(), "2,8"));
    let mut a = sweep_args(t, live.path().to_str().unwrap(), "2,8");
    a.push("--no-teacher-cache");
    ok(&a);
    assert_eq!(results(cached.path()), results(live.path()));
}

#[test]
fn an_adaptive_sweep_adds_the_ranks_the_analysis_suggests() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher().to_str().unwrap();
    let mut a = sweep_args(t, dir.path().to_str().unwrap(), "1,8,64");
    a.retain(|x| *x != "--no-analyze");
    a.extend(["--adaptive", "--adaptive-budget", "4"]);
    ok(&a);
    let ranks: Vec<u64> = results(dir.path()).iter().map(|r| r.0).collect();
    assert!(
        ranks.len() > 3 && ranks.len() <= 7,
        "ranks trained: {ranks:?}"
    );
    assert!(dir.path().join("analysis.json").exists() && dir.path().join("plot.png").exists());
}

/// `sweep --status` applies the sweep's own liveness rule: a claim whose
/// process is gone (this host) is dead at once, one that missed its beats
/// (another host) is stale; the next sweep takes both over.
#[test]
fn status_shows_dead_and_stale_claims_and_the_sweep_takes_them_over() {
    let dir = tempfile::tempdir().unwrap();
    let (t, out) = (teacher().to_str().unwrap(), dir.path().to_str().unwrap());
    let host = effrank_engine::sweep::jobs::host_name();
    let claim = |rank: usize, host: &str, pid: u32, age_s: u64| {
        let job = dir.path().join(format!("runs/r{rank}-s0"));
        std::fs::create_dir_all(&job).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let c = serde_json::json!({"host": host, "pid": pid, "epoch": 1, "updated_unix_s": now - age_s, "heartbeat": {"every_s": 30, "stale_after_beats": 4}});
        std::fs::write(job.join("running.json"), c.to_string()).unwrap();
    };
    claim(2, &host, u32::MAX - 1, 5);
    claim(4, "some-other-host", 1, 600);
    claim(8, "some-other-host", 1, 10);
    let status = ok(&["sweep", "--status", "--out", out, "--ranks", "2,4,8"]);
    let line = |rank: &str| {
        status
            .lines()
            .find(|l| l.split_whitespace().next() == Some(rank))
            .unwrap_or_else(|| panic!("no line for rank {rank}:\n{status}"))
            .to_string()
    };
    assert!(line("2").contains("dead"), "{status}");
    // 600 s, or 601 when a second boundary passed between the claim and the status.
    assert!(
        line("4").contains("stale")
            && (line("4").contains("600 s ago") || line("4").contains("601 s ago")),
        "{status}"
    );
    assert!(line("8").contains("running"), "{status}");
    let text = ok(&{
        let mut a = sweep_args(t, out, "2,4,8");
        a.retain(|x| *x != "--quiet");
        a
    });
    assert!(
        text.contains("rank 8 seed 0 is being trained by some-other-host"),
        "{text}"
    );
    let trained: Vec<u64> = results(dir.path()).iter().map(|r| r.0).collect();
    assert_eq!(
        trained,
        vec![2, 4],
        "the dead and the stale claims are taken over, the live one is not"
    );
}

/// Students trained two at once give the same bits as one after the other
/// (every random choice is a function of the job; the CPU's products are
/// the same on any thread count).
#[test]
fn students_trained_at_once_equal_students_trained_one_by_one() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let t = teacher().to_str().unwrap();
    // Six epochs, more than the teacher-logit cache holds in memory: the
    // third student starts at epoch 0 while the other is epochs ahead.
    let (p1, p2) = (one.path().to_str().unwrap(), two.path().to_str().unwrap());
    for (out, parallel) in [(p1, "1"), (p2, "2")] {
        let mut a = sweep_args(t, out, "2,4,8");
        let epochs = a.iter().position(|x| *x == "--epochs").unwrap() + 1;
        a[epochs] = "6";
        a.extend(["--parallel", parallel]);
        ok(&a);
    }
    let bits = |rows: Vec<(u64, u64, f64)>| {
        rows.into_iter()
            .map(|(r, s, a)| (r, s, a.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(results(one.path())), bits(results(two.path())));
}

/// The same at width 128, where the factorization's SVD (of 128 x 256
/// layers) takes paths that split by thread: with `--parallel 1` a worker
/// factorizes on two threads, with two workers on one. One block and one
/// epoch: the teacher's weights need not be good, only that wide.
#[test]
fn students_of_a_128_wide_teacher_are_the_same_bits_at_once_and_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher");
    let mut args = vec![
        "train", "--model", "vit-demo", "--width", "128", "--depth", "1", "--epochs", "1",
        "--device", "cpu", "--quiet", "--out",
    ];
    args.push(teacher.to_str().unwrap());
    args.extend(DEMO);
    ok(&args);
    let t = teacher.join("model.safetensors");
    let t = t.to_str().unwrap();
    let (one, two) = (dir.path().join("p1"), dir.path().join("p2"));
    for (out, parallel) in [(&one, "1"), (&two, "2")] {
        let mut a = sweep_args(t, out.to_str().unwrap(), "2,4");
        a.extend(["--parallel", parallel]);
        ok(&a);
    }
    for rank in [2, 4] {
        let student = |out: &Path| {
            let bytes = std::fs::read(out.join(format!("runs/r{rank}-s0/model.safetensors")));
            let bytes = bytes.unwrap();
            let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut tensors: Vec<(String, Vec<u8>)> = file
                .tensors()
                .into_iter()
                .map(|(name, view)| (name, view.data().to_vec()))
                .collect();
            tensors.sort();
            tensors
        };
        // Tensor by tensor: the header's key order is not part of a result.
        assert!(
            student(&one) == student(&two),
            "rank {rank}: the student's tensors differ between --parallel 1 and 2"
        );
    }
}

/// `EFFRANK_PROFILE=1` on the CPU prints the time per op of the whole
/// command, and the run's results do not change.
#[test]
fn a_profiled_cpu_run_prints_time_per_op() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "train",
        "--model",
        "vit-demo",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        dir.path().to_str().unwrap(),
    ];
    args.extend(DEMO);
    let out = Command::new(BIN)
        .args(&args)
        .env("EFFRANK_PROFILE", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("CPU time per op")
            && text.contains("linear_forward")
            && text.contains("attention_backward"),
        "{text}"
    );
}

/// The student records of a results folder, as JSON.
fn student_records(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "student")
        .collect()
}

/// `sweep --groups`: one ordinary sweep folder per group, parameter counts
/// as counted by hand, then one joint analysis; `analyze` does the same
/// from several folders, and with one folder writes the single-curve file.
#[test]
fn group_sweeps_write_a_folder_each_and_one_joint_analysis() {
    let dir = tempfile::tempdir().unwrap();
    let (t, out) = (teacher().to_str().unwrap(), dir.path().to_str().unwrap());
    let mut a = sweep_args(t, out, "1,4");
    a.retain(|x| *x != "--no-analyze");
    a.extend(["--groups", "attn,mlp"]);
    ok(&a);
    // vit-demo (72,010 parameters): attn at rank 4 replaces 4 · 2 matrices
    // of 64·64 by 4·(64 + 64) each; mlp replaces 2 · 2 of 128·64 by 4·(128 + 64).
    for (group, params) in [
        ("attn", 72_010 - 8 * (64 * 64 - 4 * 128)),
        ("mlp", 72_010 - 4 * (128 * 64 - 4 * 192)),
    ] {
        let records = student_records(&dir.path().join(group));
        let r4 = records.iter().find(|r| r["rank"] == 4).unwrap();
        assert_eq!(r4["params"], params, "{group}");
        assert_eq!(r4["settings"]["targets"]["layers"], group);
        assert!(
            dir.path().join(group).join("analysis.json").exists(),
            "each group is analyzed on its own too"
        );
    }
    // One teacher, data and augmentation: the second group reads the
    // teacher logits the first computed (one cache folder under --out).
    let summary = |group: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(group).join("sweep-summary-shard0of1.json"))
                .unwrap(),
        )
        .unwrap()
    };
    let (first, second) = (summary("attn"), summary("mlp"));
    assert!(
        first["teacher_epochs_computed"].as_u64().unwrap() > 0,
        "{first}"
    );
    assert_eq!(
        second["teacher_epochs_computed"], 0,
        "the mlp group recomputed teacher logits: {second}"
    );
    assert!(
        second["teacher_epochs_reused"].as_u64().unwrap() > 0,
        "{second}"
    );
    assert!(dir.path().join("cache").is_dir() && !dir.path().join("attn").join("cache").exists());
    let joint: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("analysis.json")).unwrap())
            .unwrap();
    let labels: Vec<&str> = joint["curves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["attn", "mlp"]);
    assert!(
        joint["curves"][0]["by_reference"].as_array().unwrap().len() == 2,
        "both normalizations"
    );
    assert!(
        dir.path().join("plot.png").exists()
            && std::fs::read_to_string(dir.path().join("summary.md"))
                .unwrap()
                .contains("| mlp |")
    );

    let (attn, mlp) = (dir.path().join("attn"), dir.path().join("mlp"));
    let again = dir.path().join("again");
    let text = ok(&[
        "analyze",
        "--results",
        attn.to_str().unwrap(),
        "--results",
        mlp.to_str().unwrap(),
        "--label",
        "a",
        "--label",
        "b",
        "--out",
        again.to_str().unwrap(),
        "--no-plot",
    ]);
    assert!(text.contains("2 curves"), "{text}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("analysis.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            v["curves"][0]["label"].as_str(),
            v["curves"][1]["label"].as_str()
        ),
        (Some("a"), Some("b"))
    );
    let e = fails(&[
        "analyze",
        "--results",
        attn.to_str().unwrap(),
        "--results",
        mlp.to_str().unwrap(),
        "--label",
        "a",
        "--label",
        "a",
    ]);
    assert!(e.contains("two curves are labelled 'a'"), "{e}");
    ok(&["analyze", "--results", attn.to_str().unwrap(), "--no-plot"]);
    let single: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(attn.join("analysis.json")).unwrap())
            .unwrap();
    assert!(
        single["mean"].is_object() && single["curves"].is_null(),
        "one --results keeps the single-curve format"
    );
}

#[test]
fn factorize_picks_layers_and_blocks_and_calibrates_svd_act() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher().to_str().unwrap();
    let s = dir.path().join("s.safetensors");
    let text = ok(&[
        "factorize",
        "--teacher",
        t,
        "--rank",
        "4",
        "--init",
        "svd-act",
        "--calibration",
        "64",
        "--layers",
        "fc1,fc2",
        "--blocks",
        "1",
        "--out",
        s.to_str().unwrap(),
    ]);
    assert!(
        text.contains("blocks.1.mlp.fc1") && text.contains("blocks.1.mlp.fc2"),
        "{text}"
    );
    assert!(
        !text.contains("blocks.0.") && !text.contains("attn."),
        "only the named layers: {text}"
    );
    assert!(text.contains("mlp in blocks 1"), "{text}");
    let e = fails(&[
        "factorize",
        "--teacher",
        t,
        "--rank",
        "4",
        "--blocks",
        "0-5",
    ]);
    assert!(
        e.contains("--blocks 0-5: the model has 2 blocks (0-1)"),
        "{e}"
    );
    let e = fails(&[
        "factorize",
        "--teacher",
        t,
        "--rank",
        "4",
        "--layers",
        "q,qkv",
    ]);
    assert!(
        e.contains("--layers") && e.contains("unknown layer 'qkv'"),
        "{e}"
    );
    let e = fails(&[
        "factorize",
        "--teacher",
        t,
        "--rank",
        "4",
        "--init",
        "svd-act",
        "--calibration",
        "0",
    ]);
    assert!(e.contains("--calibration must be at least 1"), "{e}");
}

/// `--recipe reference` runs end to end (here with a demo-sized override
/// of the resize, the ranks and the epochs) and its records say so.
#[test]
fn a_reference_recipe_sweep_records_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = vec![
        "sweep",
        "--recipe",
        "reference",
        "--teacher",
        teacher().to_str().unwrap(),
        "--ranks",
        "2,8",
        "--epochs",
        "1",
        "--resize",
        "20",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        dir.path().to_str().unwrap(),
    ];
    a.extend(DEMO);
    let text = ok(&a);
    assert!(text.contains("against the curve maximum"), "{text}");
    let r = &student_records(dir.path())[0];
    let settings = &r["settings"];
    assert_eq!(
        (r["seed"].as_u64(), settings["from_teacher"].as_str()),
        (Some(42), Some("embeddings"))
    );
    assert_eq!(settings["init"]["random"]["seed"], 42);
    assert_eq!(
        (
            settings["loss"]["feature"].as_f64(),
            settings["loss"]["ce"].as_f64()
        ),
        (Some(1.0), Some(0.0))
    );
    assert_eq!(
        settings["fit"]["min_lr"], settings["fit"]["lr"],
        "a constant learning rate"
    );
    assert_eq!(settings["fit"]["batch"], 24);
}

/// A batch larger than the training set is cut to it with a warning (no
/// step allocates for images that do not exist), and the run records the
/// batch it used.
#[test]
fn a_batch_larger_than_the_training_set_is_cut_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let text = ok(&[
        "train",
        "--model",
        "vit-demo",
        "--epochs",
        "1",
        "--batch",
        "100000",
        "--device",
        "cpu",
        "--data",
        "demo",
        "--demo-images",
        "40",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        text.contains(
            "--batch 100000 is larger than the training set (40 images); using --batch 40"
        ),
        "{text}"
    );
    let model = out.join("model.safetensors");
    let meta = effrank_engine::provenance::RunMeta::from_metadata(
        &effrank_engine::model::checkpoint::read_metadata(&model).unwrap(),
        &model,
    )
    .unwrap()
    .unwrap();
    assert_eq!(meta.fit.unwrap().batch, 40);
}
