//! Data sets larger than the data memory budget: the images stay encoded
//! where they are (a file, a row of a parquet file) and are decoded per
//! batch by a pool of threads working ahead of the trainer.
//!
//! - [`EncodedImages`]: the one thing a source supplies, "the encoded bytes
//!   of image i" and a name for it in errors ([`ImageFiles`]: a path each);
//! - [`Streamed`]: a data set's pixels as such a source plus the decoded
//!   side, the budget and the fingerprint of the decoded pixels (the same
//!   value an in-memory copy would have, see `Dataset::fingerprint`);
//! - [`BatchPlan`]: how many batches may be in flight so that they fit the
//!   budget;
//! - [`for_each_batch`]: the batches of an epoch, in order, built exactly as
//!   `augmented_batch` builds them (so a streamed epoch equals an in-memory
//!   one bit for bit), ahead of the consumer on `plan.threads` threads.
//!
//! Memory: at most `plan.depth` batches are decoded or waiting, plus the one
//! the consumer holds, plus one decoded image per thread; [`InFlight`]
//! counts those bytes and the test below holds its peak to the plan. The
//! bound is per pass: passes that run at once (a sweep's students trained
//! in parallel) each take up to their plan, which the queue's cap of two
//! batches per thread keeps far below the budget for usual batch sizes.

use super::augment::{apply, AugmentDraw};
use super::{check_indices, Augment, Dataset};
use anyhow::{anyhow, bail, Context, Result};
use image::imageops::FilterType;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Where the encoded images (PNG, JPEG) of a streamed data set come from.
/// Implement it for a new container: a folder of files is a path per image,
/// a parquet file is (file, row).
pub trait EncodedImages: Send + Sync + std::fmt::Debug {
    /// Number of images.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The encoded bytes of image `i` (`i < len()`).
    fn encoded(&self, i: usize) -> Result<Vec<u8>>;
    /// Image `i` as an error message names it: a path, "file.parquet row 7".
    fn name(&self, i: usize) -> String;
    /// Bytes the source itself holds in memory (for the memory plan).
    fn held_bytes(&self) -> u64 {
        0
    }
}

/// One file per image.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    pub paths: Vec<PathBuf>,
}

impl EncodedImages for ImageFiles {
    fn len(&self) -> usize {
        self.paths.len()
    }
    fn encoded(&self, i: usize) -> Result<Vec<u8>> {
        let path = &self.paths[i];
        std::fs::read(path).with_context(|| format!("opening image {}", path.display()))
    }
    fn name(&self, i: usize) -> String {
        self.paths[i].display().to_string()
    }
}

/// Decode one encoded image (format from its content), convert to RGB,
/// resize to `size` x `size` with a bilinear filter, and write its
/// `[3, size, size]` planes to `out`. `name` names it in errors. Both the
/// in-memory and the streamed path decode through here, so they agree.
pub fn decode_into(bytes: &[u8], name: &str, size: usize, out: &mut [u8]) -> Result<()> {
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("opening image {name}"))?
        .decode()
        .with_context(|| format!("decoding image {name}"))?
        .into_rgb8();
    let side = size as u32;
    let img = if img.dimensions() == (side, side) {
        img
    } else {
        image::imageops::resize(&img, side, side, FilterType::Triangle)
    };
    interleaved_to_planes(img.as_raw(), 3, out);
    Ok(())
}

/// `[h*w, c]` interleaved pixels to `[c, h*w]` planes in `planes`.
pub fn interleaved_to_planes(pixels: &[u8], channels: usize, planes: &mut [u8]) {
    let hw = pixels.len() / channels;
    for (i, px) in pixels.chunks_exact(channels).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            planes[c * hw + i] = v;
        }
    }
}

/// The pixels of a streamed data set: image `i` is `source`'s image
/// `items[i]`, decoded to `side` x `side` RGB when it is used.
#[derive(Clone, Debug)]
pub struct Streamed {
    pub source: Arc<dyn EncodedImages>,
    pub items: Vec<usize>,
    pub side: usize,
    /// Bytes the decoded batches in flight may take (`--data-memory`).
    pub budget: u64,
    /// `Dataset::fingerprint` of the decoded data set, computed by the pass
    /// that checked every image at load.
    pub fingerprint: String,
}

impl PartialEq for Streamed {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.source, &other.source)
            && self.items == other.items
            && self.side == other.side
            && self.fingerprint == other.fingerprint
    }
}

impl Streamed {
    /// Decode image `i` of the data set into `out` (`3 * side * side` bytes).
    pub fn decode(&self, i: usize, out: &mut [u8]) -> Result<()> {
        let item = self.items[i];
        let bytes = self.source.encoded(item)?;
        decode_into(&bytes, &self.source.name(item), self.side, out)
    }
}

/// Decode `source`'s images `items` at `side`, `chunk` images at a time (in
/// parallel), handing each decoded image, in order, to `each(k, result)`.
/// Memory: one chunk of decoded images.
pub fn decode_in_order(
    source: &dyn EncodedImages,
    items: &[usize],
    side: usize,
    chunk: usize,
    mut each: impl FnMut(usize, Result<&[u8]>) -> Result<()>,
) -> Result<()> {
    let n = 3 * side * side;
    let chunk = chunk.max(1);
    let mut buf = vec![0u8; chunk.min(items.len()) * n];
    for (c, part) in items.chunks(chunk).enumerate() {
        let results: Vec<Result<()>> = buf[..part.len() * n]
            .par_chunks_mut(n)
            .zip(part.par_iter())
            .map(|(out, &item)| {
                let bytes = source.encoded(item)?;
                decode_into(&bytes, &source.name(item), side, out)
            })
            .collect();
        for (j, r) in results.into_iter().enumerate() {
            each(c * chunk + j, r.map(|()| &buf[j * n..(j + 1) * n]))?;
        }
    }
    Ok(())
}

/// Images of `image_bytes` decoded at once by a pass over a whole streamed
/// data set (fingerprint, check at load): what `budget` holds, at most 1024.
pub fn pass_chunk(budget: u64, image_bytes: usize) -> usize {
    (budget / image_bytes.max(1) as u64).clamp(1, 1024) as usize
}

/// `Dataset::fingerprint` of streamed `ds` as if decoded: one pass over its
/// images, a budget's worth at a time.
pub fn fingerprint_streamed(ds: &Dataset) -> Result<String> {
    let Some(s) = &ds.stream else {
        return Ok(ds.fingerprint());
    };
    ds.fingerprint_with(|feed| {
        decode_in_order(
            s.source.as_ref(),
            &s.items,
            s.side,
            pass_chunk(s.budget, ds.image_len()),
            |_, image| {
                feed(image?);
                Ok(())
            },
        )
    })
}

/// How the batches of a streamed pass are prepared: `threads` decoding
/// threads, at most `depth` batches of `batch_bytes` decoded ahead of the
/// consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    pub threads: usize,
    pub depth: usize,
    pub batch_bytes: u64,
    /// Bytes of one decoded image (each thread's scratch).
    pub image_bytes: u64,
}

impl BatchPlan {
    /// The deepest queue (up to two batches per thread) whose batches, with
    /// the consumer's batch and each thread's scratch image, fit in
    /// `budget` bytes, with as many of `threads` as leave room for two
    /// batches. A budget that cannot hold two batches is an error.
    pub fn new(budget: u64, batch_bytes: u64, image_bytes: u64, threads: usize) -> Result<Self> {
        let fits = |threads: u64| budget.saturating_sub(threads * image_bytes) / batch_bytes.max(1);
        let Some(threads) = (1..=threads.max(1) as u64).rev().find(|&t| fits(t) >= 2) else {
            bail!(
                "the data memory budget of {budget} bytes holds fewer than 2 decoded batches of {batch_bytes} bytes \
                 (plus a decoded image of {image_bytes}); raise --data-memory or lower --batch"
            );
        };
        let depth = (fits(threads) - 1).min(2 * threads) as usize;
        Ok(BatchPlan {
            threads: (threads as usize).min(depth),
            depth,
            batch_bytes,
            image_bytes,
        })
    }

    /// The most decoded bytes the plan lets exist at once.
    pub fn bytes_bound(&self) -> u64 {
        (self.depth as u64 + 1) * self.batch_bytes + self.threads as u64 * self.image_bytes
    }
}

/// Decoded bytes alive in a streamed pass (batches queued or held, and the
/// threads' scratch images), with the peak, and the peak queue depth.
#[derive(Debug, Default)]
pub struct InFlight {
    bytes: AtomicU64,
    peak_bytes: AtomicU64,
    peak_batches: AtomicU64,
}

impl InFlight {
    fn add(&self, n: u64) {
        let now = self.bytes.fetch_add(n, Ordering::SeqCst) + n;
        self.peak_bytes.fetch_max(now, Ordering::SeqCst);
    }
    fn sub(&self, n: u64) {
        self.bytes.fetch_sub(n, Ordering::SeqCst);
    }
    fn batches(&self, n: usize) {
        self.peak_batches.fetch_max(n as u64, Ordering::SeqCst);
    }
    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes.load(Ordering::SeqCst)
    }
    /// Most batches decoded or being decoded ahead of the consumer at once.
    pub fn peak_batches(&self) -> usize {
        self.peak_batches.load(Ordering::SeqCst) as usize
    }
}

/// One pass over `ds`: the images at `order`, `batch` at a time, augmented
/// with `aug` as (seed, epoch) draw it.
#[derive(Clone, Copy)]
pub struct BatchPass<'a> {
    pub ds: &'a Dataset,
    pub order: &'a [usize],
    pub batch: usize,
    pub aug: &'a Augment,
    pub seed: u64,
    pub epoch: u64,
}

/// Threads that decode a streamed pass when nothing else says: every core
/// (they wait on the queue when the trainer is the slower side).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Call `consume(b, images, labels)` for batch `b` of `pass`, in order: for
/// an in-memory data set each batch is built when it is consumed
/// (`augmented_batch`); a streamed one is decoded ahead on a pool of
/// threads (`BatchPlan` from its budget). The bytes are the same either
/// way. The first error (a worker's or the consumer's) ends the pass.
pub fn for_each_batch(
    pass: BatchPass<'_>,
    consume: impl FnMut(usize, &[u8], &[u32]) -> Result<()>,
) -> Result<()> {
    match &pass.ds.stream {
        None => in_memory_pass(pass, consume),
        Some(s) => {
            let plan = BatchPlan::new(
                s.budget,
                (pass.batch.max(1) * pass.ds.image_len()) as u64,
                pass.ds.image_len() as u64,
                default_threads(),
            )?;
            streamed_pass(pass, s, &plan, &InFlight::default(), consume)
        }
    }
}

fn in_memory_pass(
    pass: BatchPass<'_>,
    mut consume: impl FnMut(usize, &[u8], &[u32]) -> Result<()>,
) -> Result<()> {
    let (mut bytes, mut labels) = (Vec::new(), Vec::new());
    for (b, chunk) in pass.order.chunks(pass.batch.max(1)).enumerate() {
        super::augmented_batch(
            pass.ds,
            chunk,
            pass.aug,
            pass.seed,
            pass.epoch,
            &mut bytes,
            &mut labels,
        )?;
        consume(b, &bytes, &labels)?;
    }
    Ok(())
}

/// A decoded batch: its images and labels.
type BuiltBatch = (Vec<u8>, Vec<u32>);

/// The queue between the decoding threads and the consumer.
struct Queue {
    /// Next batch a thread may start.
    next_start: usize,
    /// Next batch the consumer takes.
    next_take: usize,
    ready: BTreeMap<usize, Result<BuiltBatch>>,
    stop: bool,
}

/// [`for_each_batch`] for a streamed data set under `plan`, counting in
/// `in_flight`.
pub fn streamed_pass(
    pass: BatchPass<'_>,
    stream: &Streamed,
    plan: &BatchPlan,
    in_flight: &InFlight,
    mut consume: impl FnMut(usize, &[u8], &[u32]) -> Result<()>,
) -> Result<()> {
    check_indices(pass.ds, pass.order)?;
    let chunks: Vec<&[usize]> = pass.order.chunks(pass.batch.max(1)).collect();
    let queue = Mutex::new(Queue {
        next_start: 0,
        next_take: 0,
        ready: BTreeMap::new(),
        stop: false,
    });
    let changed = Condvar::new();
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..plan.threads.min(chunks.len()) {
            scope.spawn(|| {
                in_flight.add(plan.image_bytes);
                let mut scratch = vec![0u8; pass.ds.image_len()];
                loop {
                    let b = {
                        let Ok(mut q) = queue.lock() else { break };
                        while !q.stop
                            && q.next_start < chunks.len()
                            && q.next_start >= q.next_take + plan.depth
                        {
                            q = match changed.wait(q) {
                                Ok(q) => q,
                                Err(_) => return,
                            };
                        }
                        if q.stop || q.next_start >= chunks.len() {
                            break;
                        }
                        q.next_start += 1;
                        in_flight.batches(q.next_start - q.next_take);
                        q.next_start - 1
                    };
                    in_flight.add(plan.batch_bytes);
                    // A decoder that panics fails the pass with an error
                    // instead of leaving the consumer waiting for batch b.
                    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        build_batch(pass, stream, chunks[b], &mut scratch)
                    }))
                    .unwrap_or_else(|_| Err(anyhow!("decoding batch {b} panicked")));
                    let Ok(mut q) = queue.lock() else { break };
                    q.ready.insert(b, built);
                    changed.notify_all();
                }
                in_flight.sub(plan.image_bytes);
            });
        }
        let result = (|| -> Result<()> {
            for b in 0..chunks.len() {
                let built = {
                    let mut q = queue.lock().map_err(|_| poisoned())?;
                    loop {
                        if let Some(r) = q.ready.remove(&b) {
                            break r;
                        }
                        q = changed.wait(q).map_err(|_| poisoned())?;
                    }
                };
                let (bytes, labels) = built?;
                let consumed = consume(b, &bytes, &labels);
                {
                    let mut q = queue.lock().map_err(|_| poisoned())?;
                    q.next_take = b + 1;
                    changed.notify_all();
                }
                in_flight.sub(plan.batch_bytes);
                consumed?;
            }
            Ok(())
        })();
        if let Ok(mut q) = queue.lock() {
            q.stop = true;
        }
        changed.notify_all();
        result
    })
}

fn poisoned() -> anyhow::Error {
    anyhow!("the batch queue's lock is poisoned (a decoding thread panicked)")
}

/// Batch `indices` of `pass`, decoded one image at a time through `scratch`,
/// with the augmentation `augmented_batch` gives it.
fn build_batch(
    pass: BatchPass<'_>,
    stream: &Streamed,
    indices: &[usize],
    scratch: &mut [u8],
) -> Result<BuiltBatch> {
    let ds = pass.ds;
    let n = ds.image_len();
    let mut images = vec![0u8; indices.len() * n];
    for (out, &i) in images.chunks_mut(n).zip(indices) {
        if pass.aug.is_none() {
            stream.decode(i, out)?;
        } else {
            stream.decode(i, scratch)?;
            let draw = AugmentDraw::new(pass.aug, pass.seed, pass.epoch, i);
            apply(
                scratch,
                (ds.channels, ds.height, ds.width),
                pass.aug.pad,
                draw,
                out,
            );
        }
    }
    let labels = indices.iter().map(|&i| ds.labels[i]).collect();
    Ok((images, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Images that are PNG encodings of seeded noise, held in memory.
    #[derive(Debug)]
    struct Pngs(Vec<Vec<u8>>);

    impl EncodedImages for Pngs {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn encoded(&self, i: usize) -> Result<Vec<u8>> {
            Ok(self.0[i].clone())
        }
        fn name(&self, i: usize) -> String {
            format!("png {i}")
        }
    }

    fn png(side: u32, seed: u64) -> Vec<u8> {
        let mut rng = crate::rng::Rng::from_keys(&[seed]);
        let img = image::RgbImage::from_fn(side, side, |_, _| {
            image::Rgb([
                rng.below(256) as u8,
                rng.below(256) as u8,
                rng.below(256) as u8,
            ])
        });
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    /// The same 23 images, decoded in memory and streamed under `budget`.
    fn pair(budget: u64) -> (Dataset, Dataset) {
        let side = 8;
        let source = Arc::new(Pngs((0..23).map(|i| png(side as u32, i)).collect()));
        let labels: Vec<u32> = (0..23).map(|i| (i % 3) as u32).collect();
        let mut images = vec![0u8; 23 * 3 * side * side];
        for (i, out) in images.chunks_mut(3 * side * side).enumerate() {
            decode_into(&source.0[i], "", side, out).unwrap();
        }
        let decoded = Dataset::new(images, labels.clone(), 3, None, (3, side, side)).unwrap();
        let streamed = Dataset::streamed(
            Streamed {
                source,
                items: (0..23).collect(),
                side,
                budget,
                fingerprint: decoded.fingerprint(),
            },
            labels,
            3,
            None,
        )
        .unwrap();
        (decoded, streamed)
    }

    fn collect(pass: BatchPass<'_>) -> Vec<(usize, Vec<u8>, Vec<u32>)> {
        let mut seen = Vec::new();
        for_each_batch(pass, |b, bytes, labels| {
            seen.push((b, bytes.to_vec(), labels.to_vec()));
            Ok(())
        })
        .unwrap();
        seen
    }

    #[test]
    fn streamed_batches_equal_in_memory_batches() {
        let (decoded, streamed) = pair(1 << 20);
        let order = super::super::epoch_order(23, 5, 2);
        for aug in [Augment::NONE, Augment::STANDARD] {
            let pass = |ds| BatchPass {
                ds,
                order: &order,
                batch: 4,
                aug: &aug,
                seed: 5,
                epoch: 2,
            };
            let a = collect(pass(&decoded));
            let b = collect(pass(&streamed));
            assert_eq!(a.len(), 6);
            assert_eq!(a, b, "augment {aug:?}");
        }
        let (mut x, mut y) = (Vec::new(), Vec::new());
        super::super::augmented_batch(&streamed, &[3, 1], &Augment::NONE, 0, 0, &mut x, &mut y)
            .unwrap();
        assert_eq!(x, [decoded.image(3), decoded.image(1)].concat());
    }

    #[test]
    fn in_flight_bytes_and_queue_stay_within_the_plan() {
        let (_, streamed) = pair(0);
        let s = streamed.stream.as_ref().unwrap();
        let image = streamed.image_len() as u64;
        let batch_bytes = 2 * image;
        // Room for 4 batches and 3 scratch images: depth 3 with 3 threads.
        let budget = 4 * batch_bytes + 3 * image;
        let plan = BatchPlan::new(budget, batch_bytes, image, 3).unwrap();
        assert_eq!(plan.depth, 3);
        assert!(plan.bytes_bound() <= budget);
        let order: Vec<usize> = (0..23).collect();
        let in_flight = InFlight::default();
        let pass = BatchPass {
            ds: &streamed,
            order: &order,
            batch: 2,
            aug: &Augment::NONE,
            seed: 0,
            epoch: 0,
        };
        let mut taken = 0;
        streamed_pass(pass, s, &plan, &in_flight, |_, _, _| {
            // A slow consumer, so the threads fill the queue.
            std::thread::sleep(std::time::Duration::from_millis(2));
            taken += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(taken, 12);
        assert!(in_flight.peak_bytes() <= plan.bytes_bound());
        assert!(in_flight.peak_bytes() >= batch_bytes);
        assert!((1..=plan.depth).contains(&in_flight.peak_batches()));
        // Too small a budget for two batches is refused, naming the flag.
        let err = BatchPlan::new(batch_bytes, batch_bytes, image, 1).unwrap_err();
        assert!(err.to_string().contains("--data-memory"), "{err}");
    }

    #[test]
    fn a_consumer_error_or_a_bad_image_ends_the_pass() {
        let (_, streamed) = pair(1 << 20);
        let order: Vec<usize> = (0..23).collect();
        let pass = BatchPass {
            ds: &streamed,
            order: &order,
            batch: 2,
            aug: &Augment::NONE,
            seed: 0,
            epoch: 0,
        };
        let err = for_each_batch(pass, |b, _, _| {
            if b == 3 {
                bail!("stop at 3")
            }
            Ok(())
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "stop at 3");
        let mut bad = streamed.clone();
        let mut source = Pngs((0..23).map(|i| png(8, i)).collect());
        source.0[7].truncate(10);
        bad.stream.as_mut().unwrap().source = Arc::new(source);
        let err = for_each_batch(BatchPass { ds: &bad, ..pass }, |_, _, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("png 7"), "{err}");
        // A source that panics ends the pass with an error, not a hang.
        bad.stream.as_mut().unwrap().source = Arc::new(Panics);
        let err = for_each_batch(BatchPass { ds: &bad, ..pass }, |_, _, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
    }

    #[derive(Debug)]
    struct Panics;

    impl EncodedImages for Panics {
        fn len(&self) -> usize {
            23
        }
        fn encoded(&self, i: usize) -> Result<Vec<u8>> {
            panic!("image {i} cannot be read")
        }
        fn name(&self, i: usize) -> String {
            format!("panic {i}")
        }
    }
}
