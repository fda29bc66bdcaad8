//! The bad-input corpus (tests/bad_inputs/, written by
//! scripts/make_bad_inputs.py; the cases in tests/bad_inputs/cases.json):
//! every case runs the command line it names and must exit with the code
//! it states and an error message holding every string it lists, never a
//! panic.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    args: Vec<String>,
    /// Run first (must succeed), e.g. to make a file the case reads.
    #[serde(default)]
    setup: Option<Vec<String>>,
    error: Vec<String>,
    exit: i32,
    /// Permissions do not bind root: the case is skipped when running as root.
    #[serde(default)]
    unless_root: bool,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The case's arguments with the placeholders filled in and the flags that
/// keep each command small and on the CPU.
fn command_line(args: &[String], tmp: &Path, readonly: &Path) -> Vec<String> {
    let corpus = root().join("tests/bad_inputs");
    let data = root().join("tests/data");
    let fill = |a: &String| {
        a.replace("{corpus}", corpus.to_str().unwrap())
            .replace("{data}", data.to_str().unwrap())
            .replace("{tmp}", tmp.to_str().unwrap())
            .replace("{readonly}", readonly.to_str().unwrap())
    };
    let mut out: Vec<String> = args.iter().map(fill).collect();
    let command = out[0].clone();
    if ["train", "eval", "sweep", "distill"].contains(&command.as_str()) {
        out.extend(["--device", "cpu", "--quiet"].map(String::from));
        if !out.iter().any(|a| a == "--data" || a == "--demo-images") {
            out.extend(["--demo-images", "40"].map(String::from));
        }
    }
    if ["train", "sweep", "distill"].contains(&command.as_str()) {
        out.extend(["--epochs", "1"].map(String::from));
    }
    out
}

#[test]
fn every_bad_input_gives_its_error_and_exit_code() {
    let text = std::fs::read_to_string(root().join("tests/bad_inputs/cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    let as_root = is_root();
    let (mut ran, mut skipped) = (0, 0);
    for case in &cases {
        if case.unless_root && as_root {
            skipped += 1;
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let readonly = tmp.path().join("readonly");
        std::fs::create_dir_all(&readonly).unwrap();
        if let Some(setup) = &case.setup {
            let status = Command::new(BIN)
                .args(command_line(setup, tmp.path(), &readonly))
                .status()
                .unwrap();
            assert!(status.success(), "{}: setup failed", case.name);
        }
        let mut permissions = std::fs::metadata(&readonly).unwrap().permissions();
        permissions.set_readonly(true);
        std::fs::set_permissions(&readonly, permissions).unwrap();
        let args = command_line(&case.args, tmp.path(), &readonly);
        let out = Command::new(BIN)
            .args(&args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !msg.contains("panicked"),
            "{}: a panic instead of an error:\n{msg}",
            case.name
        );
        assert_eq!(
            out.status.code(),
            Some(case.exit),
            "{}: exit status {:?} (expected {}) for {args:?}:\n{msg}",
            case.name,
            out.status,
            case.exit
        );
        for want in &case.error {
            assert!(
                msg.contains(want.as_str()),
                "{}: the error does not say '{want}':\n{msg}",
                case.name
            );
        }
        let mut permissions = std::fs::metadata(&readonly).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        permissions.set_readonly(false);
        std::fs::set_permissions(&readonly, permissions).unwrap();
        ran += 1;
    }
    println!("{ran} bad-input cases gave their errors ({skipped} skipped as root)");
    assert!(ran >= 40, "only {ran} cases ran");
}
