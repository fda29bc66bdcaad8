//! Compiles every `kernels/*.cu` to PTX with NVRTC (through cudarc, loaded
//! dynamically) and writes `$OUT_DIR/kernels.rs`: a table of (kernel file
//! name, PTX text) that `src/device/cuda.rs` includes; and records the git
//! commit the engine is built from (`EFFRANK_GIT_COMMIT`, read by
//! `options::engine_version` into every run's metadata).
//!
//! NVRTC does not need a GPU. Without NVRTC the build still succeeds with an
//! empty table and a warning (the CUDA backend then reports that the binary
//! has no kernels); with `EFFRANK_REQUIRE_KERNELS=1`, a missing NVRTC or any
//! kernel that does not compile fails the build with the NVRTC log.
//! `scripts/ci_kernels.sh` installs NVRTC 13.0 and the CUDA headers from the
//! Python package index and sets the environment this script reads.

use std::fs;
use std::path::{Path, PathBuf};

/// The default PTX target: Hopper (H100/H200), PTX ISA 9.0, loadable by
/// driver 580+, and JIT-compiled by the driver for newer GPUs. Another with
/// `EFFRANK_CUDA_ARCH=compute_XY` (docs/gpu.md).
const DEFAULT_ARCH: &str = "compute_90";
const ENV_VARS: [&str; 5] = [
    "EFFRANK_REQUIRE_KERNELS",
    "EFFRANK_CUDA_ARCH",
    "CUDA_PATH",
    "CUDA_HOME",
    "LD_LIBRARY_PATH",
];

/// The PTX target: `EFFRANK_CUDA_ARCH` (`compute_` and digits), else
/// `DEFAULT_ARCH`.
fn arch() -> &'static str {
    match std::env::var("EFFRANK_CUDA_ARCH") {
        Err(_) => DEFAULT_ARCH,
        Ok(v)
            if v.strip_prefix("compute_")
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit())) =>
        {
            Box::leak(v.into_boxed_str())
        }
        Ok(v) => panic!("EFFRANK_CUDA_ARCH={v}: use compute_XY, e.g. {DEFAULT_ARCH}"),
    }
}

/// Pass the git commit of the checkout to the crate, when there is one.
fn record_git_commit() {
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(commit) = commit.filter(|c| !c.is_empty()) {
        println!("cargo:rustc-env=EFFRANK_GIT_COMMIT={commit}");
    }
}

fn main() {
    record_git_commit();
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let require = std::env::var("EFFRANK_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let sources = kernel_sources(Path::new("kernels"));
    for (_, path) in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let compiled = if nvrtc_present() {
        compile_all(&sources, &out_dir, require)
    } else {
        let msg = "NVRTC (libnvrtc.so) not found: building without CUDA kernels. To embed them, run \
                   `source scripts/ci_kernels.sh` (installs NVRTC 13.0 from PyPI and sets CUDA_PATH and \
                   LD_LIBRARY_PATH), then rebuild";
        if require {
            panic!("EFFRANK_REQUIRE_KERNELS=1: {msg}");
        }
        println!("cargo:warning={msg}");
        Vec::new()
    };
    write_table(&out_dir, &compiled);
}

/// `(file stem, path)` of every `.cu` file, sorted by name.
fn kernel_sources(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| {
            (
                p.file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                p,
            )
        })
        .collect();
    files.sort();
    files
}

fn nvrtc_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// The first folder holding `cuda_bf16.h`, from the usual CUDA locations.
fn cuda_include() -> Option<String> {
    let mut roots: Vec<PathBuf> = ["CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .map(PathBuf::from)
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    if let Ok(home) = std::env::var("HOME") {
        roots.push(PathBuf::from(home).join(".cache/effrank-cu13/nvidia/cu13"));
    }
    roots
        .into_iter()
        .map(|r| r.join("include"))
        .find(|i| i.join("cuda_bf16.h").exists())
        .map(|i| i.display().to_string())
}

/// Compiles each source; returns `(name, path of the .ptx)` for those that compiled.
fn compile_all(
    sources: &[(String, PathBuf)],
    out_dir: &Path,
    require: bool,
) -> Vec<(String, PathBuf)> {
    let mut include_paths = vec![fs::canonicalize("kernels")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "kernels".into())];
    include_paths.extend(cuda_include());
    let mut done = Vec::new();
    // Every file is compiled twice: activations in fp32 (kernel names end in
    // `_f32`) and in bf16 (`-DEFFRANK_ACT_BF16`, names end in `_bf16`); see
    // kernels/common.cuh.
    for (name, path) in sources
        .iter()
        .flat_map(|s| [(s, "f32"), (s, "bf16")])
        .map(|((n, p), v)| (format!("{n}_{v}"), p))
    {
        let name = &name;
        let src =
            fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let mut options = vec!["--std=c++17".to_string()];
        if name.ends_with("_bf16") {
            options.push("-DEFFRANK_ACT_BF16".into());
        }
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch()),
            include_paths: include_paths.clone(),
            name: Some(format!("{name}.cu")),
            options,
            ..Default::default()
        };
        match cudarc::nvrtc::compile_ptx_with_opts(&src, opts) {
            Ok(ptx) => {
                let file = out_dir.join(format!("{name}.ptx"));
                fs::write(&file, ptx.to_src())
                    .unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
                done.push((name.clone(), file));
            }
            Err(e) => {
                let log = match &e {
                    cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                        log.to_string_lossy().into_owned()
                    }
                    other => format!("{other:?}"),
                };
                if require {
                    panic!("NVRTC failed on {}:\n{log}", path.display());
                }
                println!(
                    "cargo:warning=NVRTC failed on {} (kernel file skipped): {}",
                    path.display(),
                    log.lines().next().unwrap_or("")
                );
            }
        }
    }
    done
}

fn write_table(out_dir: &Path, compiled: &[(String, PathBuf)]) {
    let mut table = String::from("/// (kernel file name, PTX) for every kernel file compiled at build time.\npub const KERNELS: &[(&str, &str)] = &[\n");
    for (name, file) in compiled {
        table.push_str(&format!(
            "    ({name:?}, include_str!({:?})),\n",
            file.display().to_string()
        ));
    }
    table.push_str("];\n");
    let path = out_dir.join("kernels.rs");
    fs::write(&path, table).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
