//! `--recipe reference`: every setting of the reference protocol
//! (`docs/method.md`, "The reference protocol") at once, for `train`
//! (the teacher) and `sweep` (the students).
//!
//! A recipe is a list of command-line flags, one per setting. Applying it
//! inserts into the command line each flag the user did not give, and the
//! line is parsed again; so a flag given explicitly wins over the recipe,
//! the recipe wins over the built-in default, and every recipe value goes
//! through the same parser and checks as the flag typed by hand. The same
//! list prints the table of `--help` and the README's.

use clap::parser::ValueSource;
use clap::{ArgMatches, ValueEnum};
use std::ffi::OsString;

/// A named set of settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Recipe {
    /// The reference protocol of the paper (see the table below).
    Reference,
}

/// One setting a recipe implies: a flag, its value, and what the protocol
/// says.
pub struct Setting {
    pub flag: &'static str,
    pub value: &'static str,
    pub why: &'static str,
}

const fn set(flag: &'static str, value: &'static str, why: &'static str) -> Setting {
    Setting { flag, value, why }
}

/// The input pipeline, shared by the teacher and its students.
const INPUT: [Setting; 3] = [
    set("--normalize", "imagenet", "ImageNet mean and std"),
    set("--resize", "256", "resize to 256 (bilinear), then center crop 224"),
    set("--crop-padding", "4", "random 32x32 crop with 4 px padding, random horizontal flip (on by default), on the 32 px image"),
];

/// The optimizer, shared by the teacher and its students.
const OPTIMIZER: [Setting; 5] = [
    set("--lr", "1e-4", "AdamW, learning rate 1e-4"),
    set(
        "--schedule",
        "constant",
        "no learning-rate schedule: constant",
    ),
    set("--warmup", "0", "no warm-up"),
    set("--wd", "0.01", "weight decay 0.01"),
    set("--clip", "0", "no gradient clipping (plain AdamW)"),
];

/// `train --recipe reference`: the teacher. The checkpoint to fine-tune
/// (`--init`) and the data (`--data`) are the user's to give.
pub static TEACHER: [&[Setting]; 3] = [
    &INPUT,
    &OPTIMIZER,
    &[
        set("--epochs", "20", "15-20 epochs"),
        set("--batch", "32", "batch 32"),
        set("--label-smoothing", "0", "plain cross-entropy"),
    ],
];

/// `sweep --recipe reference`: the students.
pub static STUDENTS: [&[Setting]; 3] = [
    &INPUT,
    &OPTIMIZER,
    &[
        set("--init", "random", "no SVD initialization: random U and V"),
        set("--from-teacher", "embeddings", "patch embedding, class token, position embedding, final LayerNorm from the teacher; all blocks fresh (q, k, v, proj, fc1, fc2 rank-r), new head"),
        set("--loss", "feature", "MSE + (1 - cos) of the 24 block features and the logits, / 25; no cross-entropy"),
        set("--epochs", "200", "200 epochs per rank (the last epoch's test accuracy is recorded)"),
        set("--batch", "24", "batch 24"),
        set("--seeds", "42", "seed 42"),
        set("--ranks", "2,4,8,16,24,32,48,64,80,96,112,128,160,192,224,256", "the reference grid"),
    ],
];

/// The settings of `recipe` for a command (`TEACHER` or `STUDENTS`).
fn settings(table: &'static [&'static [Setting]]) -> impl Iterator<Item = &'static Setting> {
    table.iter().flat_map(|part| part.iter())
}

/// The clap id of a flag: `--crop-padding` is the field `crop_padding`.
fn arg_id(flag: &str) -> String {
    flag.trim_start_matches("--").replace('-', "_")
}

/// `argv` (program, subcommand, its arguments) with the recipe's flags that
/// `given` (the subcommand's first parse) did not get from the command
/// line inserted after the subcommand.
pub fn expand(
    argv: &[OsString],
    given: &ArgMatches,
    table: &'static [&'static [Setting]],
) -> Vec<OsString> {
    let mut out = argv[..2].to_vec();
    for s in settings(table)
        .filter(|s| given.value_source(&arg_id(s.flag)) != Some(ValueSource::CommandLine))
    {
        out.extend([OsString::from(s.flag), OsString::from(s.value)]);
    }
    out.extend_from_slice(&argv[2..]);
    out
}

/// The settings as a plain-text table (for `--help`).
pub fn help_table(title: &str, table: &'static [&'static [Setting]]) -> String {
    // A setting longer than the column (the rank grid) gets a line of its own.
    const WIDTH: usize = 26;
    let mut text = format!("{title}\n");
    for s in settings(table) {
        let setting = format!("{} {}", s.flag, s.value);
        if setting.len() > WIDTH {
            text.push_str(&format!("  {setting}\n  {:WIDTH$}  {}\n", "", s.why));
        } else {
            text.push_str(&format!("  {setting:<WIDTH$}  {}\n", s.why));
        }
    }
    text
}

/// The settings as a Markdown table (the README's, which a test holds to this).
#[cfg(test)]
fn markdown_table(table: &'static [&'static [Setting]]) -> String {
    let mut text = String::from("| flag | value | reference protocol |\n|---|---|---|\n");
    for s in settings(table) {
        text.push_str(&format!("| `{}` | `{}` | {} |\n", s.flag, s.value, s.why));
    }
    text
}

/// What `train --help` says after the options.
pub fn train_help() -> String {
    format!(
        "{}\nNot set by the recipe: --init (the checkpoint to fine-tune, required with the recipe, e.g. torchvision's vit_b_32 .pth; its head is replaced by a new 100-class one for CIFAR-100) and --data (CIFAR-100). Any flag given explicitly overrides the recipe's value.",
        help_table("--recipe reference sets (the teacher of the reference protocol):", &TEACHER)
    )
}

/// What `sweep --help` says after the options.
pub fn sweep_help() -> String {
    format!(
        "{}\nThe analysis reports the region against both normalizations (the teacher's accuracy and the curve's maximum). Not set by the recipe: --teacher (the fine-tuned teacher) and --data. Any flag given explicitly overrides the recipe's value.",
        help_table("--recipe reference sets (the students of the reference protocol):", &STUDENTS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::sweep::SweepArgs;
    use crate::cli::train::TrainArgs;
    use crate::cli::{parse_from, Command};
    use effrank_engine::data::{Augment, Normalize};
    use effrank_engine::factorize::{FactorInit, FromTeacher, Targets};
    use effrank_engine::train::{CosineSchedule, FitOptions};

    fn parse(args: &[&str]) -> Command {
        let argv: Vec<OsString> = std::iter::once("effrank-engine")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        parse_from(argv)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    fn train(extra: &[&str]) -> TrainArgs {
        let mut args = vec!["train", "--recipe", "reference", "--init", "vit_b_32.pth"];
        args.extend(extra);
        match parse(&args) {
            Command::Train(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn sweep(extra: &[&str]) -> SweepArgs {
        let mut args = vec![
            "sweep",
            "--recipe",
            "reference",
            "--teacher",
            "t.safetensors",
        ];
        args.extend(extra);
        match parse(&args) {
            Command::Sweep(a) => a,
            other => panic!("{other:?}"),
        }
    }

    /// The learning rate is the same at the first, a middle and the last step.
    fn assert_constant(fit: &FitOptions, lr: f32) {
        let s = CosineSchedule {
            base_lr: fit.lr,
            min_lr: fit.min_lr,
            warmup_steps: (fit.warmup_epochs * 100.0) as usize,
            total_steps: fit.epochs * 100,
        };
        for step in [0, 1, fit.epochs * 50, fit.epochs * 100 - 1] {
            assert_eq!(s.lr(step), lr, "step {step}");
        }
    }

    #[test]
    fn the_reference_teacher_recipe_sets_each_setting() {
        let a = train(&[]);
        assert_eq!(
            a.data.normalize,
            Some(Normalize::Imagenet),
            "ImageNet mean and std"
        );
        assert_eq!(a.data.resize, Some(256), "resize 256, center crop 224");
        assert_eq!(
            a.train.augment(),
            Augment { flip: true, pad: 4 },
            "flip, 32 px crop with 4 px padding"
        );
        assert_eq!(a.train.epochs, 20);
        assert_eq!(a.train.batch, 32);
        let fit = a.train.fit_options("teacher", true);
        assert_eq!((fit.lr, fit.warmup_epochs), (1e-4, 0.0));
        assert_constant(&fit, 1e-4);
        let opt = a.train.optimizer();
        assert_eq!(
            (opt.weight_decay, opt.max_grad_norm),
            (0.01, None),
            "AdamW wd 0.01, no clipping"
        );
        assert_eq!(
            (opt.beta1, opt.beta2, opt.eps),
            (0.9, 0.999, 1e-8),
            "PyTorch's AdamW"
        );
        assert_eq!(a.label_smoothing, 0.0, "plain cross-entropy");
        assert_eq!(
            a.init.as_deref(),
            Some(std::path::Path::new("vit_b_32.pth")),
            "fine-tuned from the checkpoint"
        );
    }

    #[test]
    fn the_reference_student_recipe_sets_each_setting() {
        let a = sweep(&[]);
        let plan = a.factor.plan(42).unwrap();
        assert_eq!(
            plan.init,
            FactorInit::Random { seed: 42 },
            "random U and V, no SVD"
        );
        assert_eq!(
            plan.from_teacher,
            FromTeacher::Embeddings,
            "blocks and head fresh"
        );
        assert_eq!(
            plan.targets,
            Targets::default(),
            "q, k, v, proj, fc1, fc2 of every block"
        );
        let loss = a.loss.spec().unwrap();
        assert_eq!(
            (loss.feature, loss.ce, loss.kd),
            (1.0, 0.0, 0.0),
            "the geometric loss alone"
        );
        assert_eq!(
            loss.feature_term_weight(12),
            1.0 / 25.0,
            "24 block features + logits, / 25"
        );
        assert_eq!(a.train.epochs, 200);
        assert_eq!(a.train.batch, 24);
        let fit = a.train.fit_options("", true);
        assert_eq!((fit.lr, fit.warmup_epochs), (1e-4, 0.0));
        assert_constant(&fit, 1e-4);
        let opt = a.train.optimizer();
        assert_eq!((opt.weight_decay, opt.max_grad_norm), (0.01, None));
        assert_eq!(a.seeds, vec![42]);
        assert_eq!(
            a.ranks,
            vec![2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]
        );
        assert_eq!(
            (a.data.normalize, a.data.resize),
            (Some(Normalize::Imagenet), Some(256))
        );
        assert_eq!(a.train.augment(), Augment { flip: true, pad: 4 });
    }

    /// An explicit flag wins over the recipe, the recipe over the default,
    /// wherever the flag stands on the line.
    #[test]
    fn explicit_flags_override_the_recipe() {
        let a = train(&[
            "--epochs",
            "3",
            "--lr",
            "3e-4",
            "--no-flip",
            "--normalize",
            "half",
        ]);
        assert_eq!(
            (a.train.epochs, a.train.lr, a.data.normalize),
            (3, 3e-4, Some(Normalize::Half))
        );
        assert_eq!(
            a.train.augment(),
            Augment {
                flip: false,
                pad: 4
            }
        );
        assert_constant(&a.train.fit_options("", true), 3e-4);
        assert_eq!(a.train.batch, 32, "the rest still the recipe's");
        let s = match parse(&[
            "sweep",
            "--ranks",
            "2,4",
            "--teacher",
            "t",
            "--recipe",
            "reference",
            "--seeds",
            "0,1",
            "--loss",
            "kd",
            "--init",
            "svd",
            "--schedule",
            "cosine",
            "--warmup",
            "1",
        ]) {
            Command::Sweep(a) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!((s.ranks, s.seeds), (vec![2, 4], vec![0, 1]));
        assert_eq!(s.loss.spec().unwrap().kd, 1.0);
        assert_eq!(s.factor.plan(0).unwrap().init, FactorInit::Svd);
        assert_eq!(s.factor.from_teacher, FromTeacher::Embeddings);
        let fit = s.train.fit_options("", true);
        assert_eq!(
            (fit.min_lr, fit.warmup_epochs),
            (1e-5_f32.min(1e-4), 1.0),
            "a cosine from 1e-4 down to --min-lr's default"
        );
        // Without the recipe the defaults are untouched.
        let Command::Train(plain) = parse(&["train"]) else {
            panic!("train")
        };
        assert_eq!(
            (
                plain.train.epochs,
                plain.train.batch,
                plain.data.resize,
                plain.data.normalize
            ),
            (10, 64, None, None)
        );
        assert!(
            parse_from(
                ["effrank-engine", "sweep", "--demo", "--recipe", "reference"]
                    .map(OsString::from)
                    .to_vec()
            )
            .is_err(),
            "--demo has its own settings"
        );
    }

    /// The README carries the tables this file prints, word for word.
    #[test]
    fn the_readme_shows_both_tables() {
        let readme = include_str!("../../README.md");
        for (what, table) in [("teacher", &TEACHER), ("students", &STUDENTS)] {
            assert!(
                readme.contains(&markdown_table(table)),
                "README lacks the {what} table:\n{}",
                markdown_table(table)
            );
        }
    }

    #[test]
    fn every_flag_is_set_once_per_command() {
        for table in [&TEACHER, &STUDENTS] {
            let mut flags: Vec<&str> = settings(table).map(|s| s.flag).collect();
            flags.sort();
            let n = flags.len();
            flags.dedup();
            assert_eq!(flags.len(), n);
        }
        assert_eq!(arg_id("--crop-padding"), "crop_padding");
    }
}
