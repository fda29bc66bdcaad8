//! The data layer end to end: loaders read files written here in the
//! documented formats (CIFAR-10 and CIFAR-100 binaries, image folders with PNG
//! and JPEG), every bad input gives an error that names what is wrong, the
//! demo data is deterministic, balanced and learnable but not linearly, and
//! augmentation is a pure function of (seed, epoch, index).

use effrank_engine::data::augment::{apply, AugmentDraw};
use effrank_engine::data::cifar::{CifarKind, PIXELS};
use effrank_engine::data::{
    augmented_batch, demo, epoch_order, load_data, Augment, DataSource, Dataset, DemoConfig,
    LoadOptions,
};
use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};

// ---- helpers --------------------------------------------------------------

/// A CIFAR record: label bytes, then pixels that encode (record, byte).
fn cifar_record(label_bytes: &[u8], tag: u8) -> Vec<u8> {
    let mut r = label_bytes.to_vec();
    r.extend((0..PIXELS).map(|i| (i as u8).wrapping_mul(7).wrapping_add(tag)));
    r
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

fn opts(size: usize, skip_bad: bool) -> LoadOptions {
    LoadOptions {
        image_size: size,
        skip_bad,
        ..LoadOptions::default()
    }
}

/// A `w` x `h` RGB image whose pixel (x, y) is (seed + x, seed + 2y, seed + x + y).
fn pattern_image(w: u32, h: u32, seed: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([seed + x as u8, seed + 2 * y as u8, seed + (x + y) as u8])
    })
}

/// The `[3, h, w]` planes of `img`.
fn planes(img: &RgbImage) -> Vec<u8> {
    (0..3)
        .flat_map(|c| img.pixels().map(move |p| p[c]))
        .collect()
}

fn save(img: &RgbImage, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

// ---- CIFAR ----------------------------------------------------------------

#[test]
fn cifar10_batches_load_in_numeric_order_from_the_archive_folder() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cifar-10-batches-bin");
    // data_batch_10 must come after data_batch_2 (numeric, not text, order).
    write(
        &dir.join("data_batch_1.bin"),
        &[cifar_record(&[3], 1), cifar_record(&[9], 2)].concat(),
    );
    write(&dir.join("data_batch_2.bin"), &cifar_record(&[0], 3));
    write(&dir.join("data_batch_10.bin"), &cifar_record(&[5], 4));
    write(&dir.join("test_batch.bin"), &cifar_record(&[7], 5));
    write(
        &dir.join("batches.meta.txt"),
        b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n",
    );

    let src = DataSource::resolve(root.path().to_str().unwrap()).unwrap();
    let DataSource::Cifar { kind, train, .. } = &src else {
        panic!("resolved to {src:?}")
    };
    assert_eq!(*kind, CifarKind::Cifar10);
    let names: Vec<_> = train
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["data_batch_1.bin", "data_batch_2.bin", "data_batch_10.bin"]
    );

    let data = src.load(&LoadOptions::default()).unwrap();
    assert_eq!(data.train.labels, vec![3, 9, 0, 5]);
    assert_eq!(data.test.labels, vec![7]);
    assert_eq!(
        (
            data.train.classes,
            data.train.channels,
            data.train.height,
            data.train.width
        ),
        (10, 3, 32, 32)
    );
    assert_eq!(data.train.image(1), &cifar_record(&[9], 2)[1..]);
    assert_eq!(data.test.image(0), &cifar_record(&[7], 5)[1..]);
    assert_eq!(data.train.class_names.as_ref().unwrap()[3], "cat");
    assert!(data.summary().contains("CIFAR-10"), "{}", data.summary());
}

#[test]
fn cifar100_uses_fine_labels() {
    let root = tempfile::tempdir().unwrap();
    write(
        &root.path().join("train.bin"),
        &[cifar_record(&[19, 99], 1), cifar_record(&[0, 42], 2)].concat(),
    );
    write(&root.path().join("test.bin"), &cifar_record(&[4, 17], 3));
    let data = load_data(root.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(data.train.classes, 100);
    assert_eq!(data.train.labels, vec![99, 42]);
    assert_eq!(data.test.labels, vec![17]);
    assert_eq!(data.train.image(0), &cifar_record(&[19, 99], 1)[2..]);
    assert_eq!(data.test.image(0), &cifar_record(&[4, 17], 3)[2..]);
    assert_eq!(data.train.class_names, None);

    // Also found inside the archive's own folder name.
    let root2 = tempfile::tempdir().unwrap();
    let dir = root2.path().join("cifar-100-binary");
    write(&dir.join("train.bin"), &cifar_record(&[1, 2], 0));
    write(&dir.join("test.bin"), &cifar_record(&[1, 3], 0));
    let data = load_data(root2.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(
        (data.train.labels.clone(), data.test.labels.clone()),
        (vec![2], vec![3])
    );
}

#[test]
fn truncated_cifar_file_names_file_size_and_record_size() {
    let root = tempfile::tempdir().unwrap();
    let mut bytes = cifar_record(&[0, 1], 0);
    bytes.extend_from_slice(&[0; 100]);
    write(&root.path().join("train.bin"), &bytes);
    write(&root.path().join("test.bin"), &cifar_record(&[0, 1], 0));
    let err = err_of(load_data(
        root.path().to_str().unwrap(),
        &LoadOptions::default(),
    ));
    assert!(
        err.contains("train.bin")
            && err.contains("3174 bytes")
            && err.contains("3074-byte CIFAR-100"),
        "{err}"
    );
}

#[test]
fn cifar_label_out_of_range_names_file_and_record() {
    let root = tempfile::tempdir().unwrap();
    write(&root.path().join("train.bin"), &cifar_record(&[0, 1], 0));
    write(
        &root.path().join("test.bin"),
        &[cifar_record(&[0, 1], 0), cifar_record(&[0, 100], 0)].concat(),
    );
    let err = err_of(load_data(
        root.path().to_str().unwrap(),
        &LoadOptions::default(),
    ));
    assert!(err.contains("test.bin: record 1 has label 100"), "{err}");
}

#[test]
fn half_a_cifar_set_is_a_missing_split_error() {
    let root = tempfile::tempdir().unwrap();
    write(&root.path().join("train.bin"), &cifar_record(&[0, 1], 0));
    let err = err_of(load_data(
        root.path().to_str().unwrap(),
        &LoadOptions::default(),
    ));
    assert!(err.contains("train.bin but no test.bin"), "{err}");

    let root = tempfile::tempdir().unwrap();
    write(
        &root.path().join("data_batch_1.bin"),
        &cifar_record(&[0], 0),
    );
    let err = err_of(load_data(
        root.path().to_str().unwrap(),
        &LoadOptions::default(),
    ));
    assert!(err.contains("no test_batch.bin"), "{err}");
}

// ---- image folders ----------------------------------------------------------

/// train/{cat,dog} and test/{cat} (or `test_name`), PNG and JPEG, 8x8.
fn image_tree(root: &Path, test_name: &str) -> Vec<(PathBuf, RgbImage)> {
    let files = [
        ("train/dog/a.png", pattern_image(8, 8, 10)),
        ("train/cat/b.png", pattern_image(8, 8, 20)),
        ("train/cat/a.jpg", pattern_image(8, 8, 30)),
        ("train/cat/notes.txt", pattern_image(1, 1, 0)),
        (&format!("{test_name}/cat/c.PNG"), pattern_image(8, 8, 40)),
    ];
    let mut written = Vec::new();
    for (rel, img) in files {
        let path = root.join(rel);
        if rel.ends_with(".txt") {
            write(&path, b"not an image, ignored");
        } else {
            let ext = if rel.ends_with(".PNG") {
                image::ImageFormat::Png
            } else {
                image::ImageFormat::from_path(&path).unwrap()
            };
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            img.save_with_format(&path, ext).unwrap();
            written.push((path, img));
        }
    }
    written
}

#[test]
fn image_folders_map_sorted_classes_and_read_png_and_jpeg() {
    let root = tempfile::tempdir().unwrap();
    let files = image_tree(root.path(), "test");
    let data = load_data(root.path().to_str().unwrap(), &opts(8, false)).unwrap();
    assert_eq!(
        data.train.class_names.as_deref(),
        Some(&["cat".to_string(), "dog".to_string()][..])
    );
    // Order: class "cat" (a.jpg, b.png), then "dog" (a.png).
    assert_eq!(data.train.labels, vec![0, 0, 1]);
    assert_eq!(data.test.labels, vec![0]);
    assert_eq!(
        (data.train.channels, data.train.height, data.train.width),
        (3, 8, 8)
    );
    // PNG is lossless: exact planes.
    assert_eq!(data.train.image(1), planes(&files[1].1));
    assert_eq!(data.train.image(2), planes(&files[0].1));
    assert_eq!(data.test.image(0), planes(&files[3].1));
    // JPEG is lossy: close.
    let jpeg_err = data
        .train
        .image(0)
        .iter()
        .zip(planes(&files[2].1))
        .map(|(&a, b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap();
    assert!(jpeg_err <= 12, "JPEG differs by up to {jpeg_err}");
    assert!(data.skipped.is_empty());
}

#[test]
fn image_folders_resize_bilinear_and_accept_val() {
    let root = tempfile::tempdir().unwrap();
    image_tree(root.path(), "val");
    let data = load_data(root.path().to_str().unwrap(), &opts(4, false)).unwrap();
    assert_eq!(
        (data.train.height, data.train.width, data.test.len()),
        (4, 4, 1)
    );
    // A 2x downscale of the linear ramp x + 40 (red plane) stays a ramp near 41.5 + 2x.
    let red = &data.test.image(0)[..16];
    for (i, &v) in red.iter().enumerate() {
        let expected = 41.5 + 2.0 * (i % 4) as f32;
        assert!(
            (v as f32 - expected).abs() <= 1.5,
            "red pixel {i} = {v}, expected about {expected}"
        );
    }
}

#[test]
fn corrupt_image_is_named_or_skipped_and_counted() {
    let root = tempfile::tempdir().unwrap();
    let files = image_tree(root.path(), "test");
    // Sorts before train/dog/a.png, so skipping it must close the gap.
    write(
        &root.path().join("train/dog/0broken.png"),
        b"\x89PNG\r\n\x1a\n this is not really a PNG",
    );
    let err = err_of(load_data(root.path().to_str().unwrap(), &opts(8, false)));
    eprintln!("{err}");
    assert!(
        err.contains("decoding image") && err.contains("0broken.png") && err.contains("skip-bad"),
        "{err}"
    );

    let data = load_data(root.path().to_str().unwrap(), &opts(8, true)).unwrap();
    assert_eq!(data.skipped.len(), 1);
    assert!(data.skipped[0].0.ends_with("train/dog/0broken.png"));
    assert_eq!(data.train.len(), 3);
    assert_eq!(data.train.labels, vec![0, 0, 1]);
    assert_eq!(data.train.image(2), planes(&files[0].1));
    assert!(
        data.summary().contains("1 unreadable images skipped"),
        "{}",
        data.summary()
    );
}

#[test]
fn test_class_missing_from_train_is_an_error() {
    let root = tempfile::tempdir().unwrap();
    image_tree(root.path(), "test");
    save(
        &pattern_image(8, 8, 0),
        &root.path().join("test/zebra/z.png"),
    );
    let err = err_of(load_data(root.path().to_str().unwrap(), &opts(8, false)));
    assert!(
        err.contains("'zebra'") && err.contains("not among the training classes"),
        "{err}"
    );
}

#[test]
fn missing_test_split_and_empty_folders_are_errors() {
    let root = tempfile::tempdir().unwrap();
    let spec = root.path().to_str().unwrap().to_string();
    let err = err_of(load_data(&spec, &opts(8, false)));
    assert!(
        err.contains("holds no CIFAR files") && err.contains("no train/ image folder"),
        "{err}"
    );

    std::fs::create_dir_all(root.path().join("train")).unwrap();
    let err = err_of(load_data(&spec, &opts(8, false)));
    assert!(err.contains("missing test split"), "{err}");

    std::fs::create_dir_all(root.path().join("test")).unwrap();
    let err = err_of(load_data(&spec, &opts(8, false)));
    assert!(err.contains("has no class sub-folders"), "{err}");

    std::fs::create_dir_all(root.path().join("train/cat")).unwrap();
    write(&root.path().join("train/cat/readme.txt"), b"x");
    let err = err_of(load_data(&spec, &opts(8, false)));
    assert!(err.contains("has no images"), "{err}");

    let err = err_of(load_data("/no/such/folder", &opts(8, false)));
    assert!(
        err.contains("neither 'demo' nor an existing folder"),
        "{err}"
    );
}

#[test]
fn all_images_unreadable_with_skip_bad_is_still_an_error() {
    let root = tempfile::tempdir().unwrap();
    image_tree(root.path(), "test");
    write(&root.path().join("test/cat/c.PNG"), b"garbage");
    let err = err_of(load_data(root.path().to_str().unwrap(), &opts(8, true)));
    assert!(err.contains("no readable images"), "{err}");
}

// ---- demo -----------------------------------------------------------------

#[test]
fn demo_is_deterministic_balanced_and_fast() {
    let cfg = DemoConfig::default();
    let start = std::time::Instant::now();
    let (train, test) = demo::generate(&cfg).unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!("demo generation: {elapsed:.3} s");
    assert!(elapsed < 3.0, "demo generation took {elapsed:.2} s");
    assert_eq!((train.len(), test.len(), train.classes), (4000, 1000, 10));
    assert_eq!((train.channels, train.height, train.width), (3, 16, 16));
    assert_eq!(train.class_counts(), vec![400; 10]);
    assert_eq!(test.class_counts(), vec![100; 10]);

    let (train2, test2) = demo::generate(&cfg).unwrap();
    assert_eq!(train, train2);
    assert_eq!(test, test2);
    let (train3, _) = demo::generate(&DemoConfig { seed: 1, ..cfg }).unwrap();
    assert_ne!(train.images, train3.images);
    // Train and test come from disjoint streams: no test image repeats a training one.
    let seen: std::collections::HashSet<&[u8]> = (0..train.len()).map(|i| train.image(i)).collect();
    assert!((0..test.len()).all(|i| !seen.contains(test.image(i))));
    // Pixels use the range: not washed out, not saturated.
    let mean = train.images.iter().map(|&v| v as f64).sum::<f64>() / train.images.len() as f64;
    assert!((90.0..165.0).contains(&mean), "mean pixel {mean}");

    let via_spec = load_data("demo", &LoadOptions::default()).unwrap();
    assert_eq!(via_spec.train, train);
}

/// Nearest class mean, features standardized on the training set; returns
/// test accuracy.
fn nearest_centroid(
    train: &[Vec<f32>],
    train_y: &[u32],
    test: &[Vec<f32>],
    test_y: &[u32],
    classes: usize,
) -> f64 {
    let d = train[0].len();
    let n = train.len() as f32;
    let mean: Vec<f32> = (0..d)
        .map(|j| train.iter().map(|f| f[j]).sum::<f32>() / n)
        .collect();
    let std: Vec<f32> = (0..d)
        .map(|j| {
            (train.iter().map(|f| (f[j] - mean[j]).powi(2)).sum::<f32>() / n)
                .sqrt()
                .max(1e-6)
        })
        .collect();
    let z = |f: &Vec<f32>| -> Vec<f32> { (0..d).map(|j| (f[j] - mean[j]) / std[j]).collect() };
    let mut centroids = vec![vec![0f32; d]; classes];
    let mut counts = vec![0f32; classes];
    for (f, &y) in train.iter().zip(train_y) {
        for (c, v) in centroids[y as usize].iter_mut().zip(z(f)) {
            *c += v;
        }
        counts[y as usize] += 1.0;
    }
    for (c, n) in centroids.iter_mut().zip(&counts) {
        c.iter_mut().for_each(|v| *v /= n);
    }
    let correct = test.iter().zip(test_y).filter(|(f, &y)| {
        let zf = z(f);
        let dist = |c: &Vec<f32>| c.iter().zip(&zf).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
        let best = (0..classes)
            .min_by(|&a, &b| dist(&centroids[a]).total_cmp(&dist(&centroids[b])))
            .unwrap();
        best == y as usize
    });
    correct.count() as f64 / test.len() as f64
}

/// Phase-invariant features: log power of the luminance's 2-D DFT at every
/// frequency, and each channel's mean and standard deviation.
fn spectral_features(ds: &Dataset, i: usize) -> Vec<f32> {
    let (s, img) = (ds.width, ds.image(i));
    let lum: Vec<f32> = (0..s * s)
        .map(|p| (0..3).map(|c| img[c * s * s + p] as f32).sum::<f32>())
        .collect();
    let mut f = Vec::new();
    for ky in 0..s {
        for kx in 0..=s / 2 {
            let (mut re, mut im) = (0f32, 0f32);
            for y in 0..s {
                for x in 0..s {
                    let a = -2.0 * std::f32::consts::PI * ((kx * x + ky * y) as f32) / s as f32;
                    re += lum[y * s + x] * a.cos();
                    im += lum[y * s + x] * a.sin();
                }
            }
            f.push((1.0 + re * re + im * im).ln());
        }
    }
    for c in 0..3 {
        let plane = &img[c * s * s..(c + 1) * s * s];
        let m = plane.iter().map(|&v| v as f32).sum::<f32>() / (s * s) as f32;
        let v = plane.iter().map(|&v| (v as f32 - m).powi(2)).sum::<f32>() / (s * s) as f32;
        f.extend([m, v.sqrt()]);
    }
    f
}

#[test]
fn demo_is_learnable_but_not_from_a_linear_read_of_the_pixels() {
    let (train, test) = demo::generate(&DemoConfig::default()).unwrap();
    let pixels = |ds: &Dataset| -> Vec<Vec<f32>> {
        (0..ds.len())
            .map(|i| ds.image(i).iter().map(|&v| v as f32).collect())
            .collect()
    };
    let spectra = |ds: &Dataset| -> Vec<Vec<f32>> {
        (0..ds.len()).map(|i| spectral_features(ds, i)).collect()
    };
    let raw = nearest_centroid(
        &pixels(&train),
        &train.labels,
        &pixels(&test),
        &test.labels,
        10,
    );
    let spectral = nearest_centroid(
        &spectra(&train),
        &train.labels,
        &spectra(&test),
        &test.labels,
        10,
    );
    eprintln!("nearest class mean: raw pixels {raw:.3}, spectral features {spectral:.3}");
    assert!(
        spectral > 0.5,
        "phase-invariant features reach only {spectral}"
    );
    assert!(
        raw < spectral - 0.15,
        "raw pixels {raw} vs spectral {spectral}: the demo is too linear"
    );
    assert!(
        spectral < 0.97,
        "a nearest-mean classifier solves the demo ({spectral}): too easy"
    );
}

// ---- augmentation -----------------------------------------------------------

/// Two 3x4 planes with distinct values 1..=24.
fn hand_image() -> Dataset {
    Dataset::new((1..=24).collect(), vec![0], 1, None, (2, 3, 4)).unwrap()
}

#[test]
fn crop_and_flip_move_the_right_pixels() {
    let ds = hand_image();
    let mut out = vec![0u8; 24];
    // Plane 0 is
    //   1  2  3  4
    //   5  6  7  8
    //   9 10 11 12
    // Padded by 1, crop offset (dy, dx) = (0, 2): output (y, x) = source (y - 1, x + 1).
    apply(
        ds.image(0),
        (2, 3, 4),
        1,
        AugmentDraw {
            dy: 0,
            dx: 2,
            flip: false,
        },
        &mut out,
    );
    assert_eq!(&out[..12], &[0, 0, 0, 0, 2, 3, 4, 0, 6, 7, 8, 0]);
    assert_eq!(&out[12..], &[0, 0, 0, 0, 14, 15, 16, 0, 18, 19, 20, 0]);
    // Flip only.
    apply(
        ds.image(0),
        (2, 3, 4),
        0,
        AugmentDraw {
            dy: 0,
            dx: 0,
            flip: true,
        },
        &mut out,
    );
    assert_eq!(&out[..12], &[4, 3, 2, 1, 8, 7, 6, 5, 12, 11, 10, 9]);
    // Crop (dy, dx) = (2, 1) then flip: output (y, x) = source (y + 1, 3 - x).
    apply(
        ds.image(0),
        (2, 3, 4),
        1,
        AugmentDraw {
            dy: 2,
            dx: 1,
            flip: true,
        },
        &mut out,
    );
    assert_eq!(&out[..12], &[8, 7, 6, 5, 12, 11, 10, 9, 0, 0, 0, 0]);
    // Centre crop, no flip: identity.
    apply(
        ds.image(0),
        (2, 3, 4),
        1,
        AugmentDraw {
            dy: 1,
            dx: 1,
            flip: false,
        },
        &mut out,
    );
    assert_eq!(out, ds.image(0));
}

#[test]
fn augmentation_repeats_for_equal_keys_and_differs_otherwise() {
    let (train, _) = demo::generate(&DemoConfig {
        train: 64,
        test: 1,
        ..DemoConfig::default()
    })
    .unwrap();
    let aug = Augment::STANDARD;
    let batch = |idx: &[usize], seed: u64, epoch: u64| {
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        augmented_batch(&train, idx, &aug, seed, epoch, &mut images, &mut labels).unwrap();
        (images, labels)
    };
    let idx: Vec<usize> = (0..64).collect();
    let (a, labels) = batch(&idx, 1, 0);
    assert_eq!(labels, train.labels);
    assert_eq!(a, batch(&idx, 1, 0).0);
    assert_ne!(a, batch(&idx, 1, 1).0);
    assert_ne!(a, batch(&idx, 2, 0).0);
    // An image's augmentation depends on its index, not its place in the batch.
    let n = train.image_len();
    let (b, blabels) = batch(&[17, 3], 1, 0);
    assert_eq!(&b[..n], &a[17 * n..18 * n]);
    assert_eq!(&b[n..], &a[3 * n..4 * n]);
    assert_eq!(blabels, vec![train.labels[17], train.labels[3]]);
    // Augmentation changed most images (a centred, unflipped crop is 1 in 162).
    let changed = (0..64)
        .filter(|&i| a[i * n..(i + 1) * n] != *train.image(i))
        .count();
    assert!(changed >= 60, "only {changed} of 64 images changed");
}

#[test]
fn no_augmentation_copies_and_bad_index_is_an_error() {
    let ds = hand_image();
    let (mut images, mut labels) = (vec![9; 5], vec![9]);
    augmented_batch(&ds, &[0, 0], &Augment::NONE, 1, 2, &mut images, &mut labels).unwrap();
    assert_eq!(images, [ds.image(0), ds.image(0)].concat());
    assert_eq!(labels, vec![0, 0]);
    let err = err_of(augmented_batch(
        &ds,
        &[1],
        &Augment::NONE,
        1,
        2,
        &mut images,
        &mut labels,
    ));
    assert!(err.contains("index 1 is out of range"), "{err}");
}

#[test]
fn epoch_order_covers_every_image_once() {
    let mut order = epoch_order(1000, 7, 3);
    assert_ne!(order, (0..1000).collect::<Vec<_>>());
    order.sort();
    assert_eq!(order, (0..1000).collect::<Vec<_>>());
}
