"""The data-format fixtures of tests/fixtures/ (read by tests/data_formats.rs).

    pip install --target /tmp/pydeps numpy pyarrow pillow
    PYTHONPATH=/tmp/pydeps python3 scripts/make_data_fixtures.py [OUT_DIR]

One small set of 32x32 images (CIFAR-10: 20 training images in two
batches, 10 test images; CIFAR-100: 10 and 5), written in every format the
engine reads, so that a test can hold the loaders to the same tensors bit
for bit:

- cifar10-bin/cifar-10-batches-bin/, cifar100-bin/cifar-100-binary/: the
  binary records, with batches.meta.txt / fine_label_names.txt;
- cifar10-py/cifar-10-batches-py/, cifar100-py/cifar-100-python/: the
  pickles as the official archives hold them: protocol 2 written opcode by
  opcode as Python 2's cPickle wrote them (keys and every other string as
  SHORT_BINSTRING / BINSTRING, the pixels as a numpy uint8 array
  [n, 3072] under numpy.core.multiarray._reconstruct, numpy.dtype and
  BUILD, the labels as a list of ints), checked here by loading them back
  with pickle.load(encoding='latin1') as torchvision does;
- cifar10-folder/: the same images as an image folder of PNG files;
- hf-parquet/data/{train,test}-00000-of-00001.parquet: the CIFAR-10 images
  as a Hugging Face datasets parquet folder, images as {bytes, path}
  structs of PNG bytes, labels as int64, ClassLabel names in the schema's
  'huggingface' metadata (pyarrow's default compression, snappy);
- hf-mixed/: train.parquet with PNG and JPEG rows (some 40x40, so they are
  resized), validation.parquet (the test split: there is no test file),
  unsupervised.parquet (not read), and the same encoded files in
  hf-mixed-folder/ as an image folder, so the engine's own decode of the
  folder is the reference for the parquet rows;
- bad/: a truncated pickle, a pickle that names os.system, a parquet file
  without an image column, one with a label out of range, and a truncated
  parquet file.
"""
import io
import json
import os
import pickle
import shutil
import struct
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "tests", "fixtures")

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_NAMES = [f"fine_{i:02d}" for i in range(100)]


def images(n, seed):
    """n smooth 32x32 RGB images [n, 3, 32, 32] uint8 (smooth, so PNG stays small)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    out = np.empty((n, 3, 32, 32), np.uint8)
    for i in range(n):
        for c in range(3):
            a, b, p = rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(0, 255)
            out[i, c] = ((a * x + b * y + p) % 256).astype(np.uint8)
    return out


# ---- Python 2 style pickles -------------------------------------------------

class Py2Pickler:
    """Protocol 2 as Python 2's cPickle wrote the CIFAR files: every str is
    a Python 2 str (SHORT_BINSTRING / BINSTRING), every container and object
    is memoized with BINPUT, lists and dicts are filled with APPENDS /
    SETITEMS in batches of 1000."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.memo = 0

    def put(self):
        self.memo += 1
        self.out += b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo)

    def string(self, s):
        if isinstance(s, str):
            s = s.encode("latin1")
        if len(s) < 256:
            self.out += b"U" + bytes([len(s)]) + s
        else:
            self.out += b"T" + struct.pack("<I", len(s)) + s
        self.put()

    def int(self, i):
        if 0 <= i < 256:
            self.out += b"K" + bytes([i])
        elif 0 <= i < 65536:
            self.out += b"M" + struct.pack("<H", i)
        else:
            self.out += b"J" + struct.pack("<i", i)

    def glob(self, module, name):
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        self.put()

    def dtype(self, arr):
        self.glob("numpy", "dtype")
        self.string(arr.dtype.str[1:])
        self.out += b"K\x00K\x01\x87R"
        self.put()
        self.out += b"(K\x03"
        self.string(arr.dtype.str[0])
        self.out += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"

    def array(self, arr):
        arr = np.ascontiguousarray(arr)
        self.glob("numpy.core.multiarray", "_reconstruct")
        self.glob("numpy", "ndarray")
        self.out += b"K\x00\x85"
        self.string("b")
        self.out += b"\x87R"
        self.put()
        self.out += b"(K\x01("
        for d in arr.shape:
            self.int(d)
        self.out += b"t"
        self.dtype(arr)
        self.out += b"\x89"
        self.string(arr.tobytes())
        self.out += b"tb"

    def value(self, v):
        if isinstance(v, (str, bytes)):
            self.string(v)
        elif isinstance(v, int):
            self.int(v)
        elif isinstance(v, np.ndarray):
            self.array(v)
        elif isinstance(v, list):
            self.out += b"]"
            self.put()
            for start in range(0, len(v), 1000):
                self.out += b"("
                for item in v[start:start + 1000]:
                    self.value(item)
                self.out += b"e"
        elif isinstance(v, dict):
            self.out += b"}"
            self.put()
            self.out += b"("
            for k, item in v.items():
                self.string(k)
                self.value(item)
            self.out += b"u"
        else:
            raise TypeError(type(v))

    def dumps(self, v):
        self.value(v)
        return bytes(self.out + b".")


def write_pickle(path, obj):
    data = Py2Pickler().dumps(obj)
    with open(path, "wb") as f:
        f.write(data)
    # Read back as torchvision reads it.
    with open(path, "rb") as f:
        back = pickle.load(f, encoding="latin1")
    for k, v in obj.items():
        k = k.decode("latin1") if isinstance(k, bytes) else k
        got = back[k]
        if isinstance(v, np.ndarray):
            assert got.dtype == v.dtype and got.shape == v.shape and (got == v).all(), k
        else:
            assert got == v, k


def mkdir(*parts):
    path = os.path.join(OUT, *parts)
    os.makedirs(path, exist_ok=True)
    return path


# ---- the sets ---------------------------------------------------------------

def sorted_labels(n, classes, seed):
    """n labels covering as many classes as they can, sorted, so that an image
    folder (read in class order) keeps the same order."""
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.permutation(np.arange(n) % classes))
    return [int(l) for l in labels]


def cifar10():
    train_x, test_x = images(20, 1), images(10, 2)
    # Batch 1 holds classes 0-4, batch 2 classes 5-9: their concatenation is
    # in class order, as an image folder is read.
    train_y = [i // 2 for i in range(20)]
    test_y = list(range(10))
    batches = [(train_x[:10], train_y[:10]), (train_x[10:], train_y[10:])]

    binary = mkdir("cifar10-bin", "cifar-10-batches-bin")
    for i, (x, y) in enumerate(batches, 1):
        write_binary(os.path.join(binary, f"data_batch_{i}.bin"), x, [[l] for l in y])
    write_binary(os.path.join(binary, "test_batch.bin"), test_x, [[l] for l in test_y])
    with open(os.path.join(binary, "batches.meta.txt"), "w") as f:
        f.write("\n".join(CIFAR10_NAMES) + "\n\n")

    py = mkdir("cifar10-py", "cifar-10-batches-py")
    for i, (x, y) in enumerate(batches, 1):
        write_pickle(os.path.join(py, f"data_batch_{i}"), batch(f"training batch {i} of 2", "labels", x, y))
    write_pickle(os.path.join(py, "test_batch"), batch("testing batch 1 of 1", "labels", test_x, test_y))
    write_pickle(os.path.join(py, "batches.meta"),
                 {b"num_cases_per_batch": 10, b"label_names": CIFAR10_NAMES, b"num_vis": 3072})

    for split, x, y in [("train", train_x, train_y), ("test", test_x, test_y)]:
        for i, (img, l) in enumerate(zip(x, y)):
            d = mkdir("cifar10-folder", split, CIFAR10_NAMES[l])
            Image.fromarray(img.transpose(1, 2, 0)).save(os.path.join(d, f"{i:03d}.png"))

    d = mkdir("hf-parquet", "data")
    for split, x, y in [("train", train_x, train_y), ("test", test_x, test_y)]:
        rows = [(png(img), l, f"{i}.png") for i, (img, l) in enumerate(zip(x, y))]
        write_parquet(os.path.join(d, f"{split}-00000-of-00001.parquet"), rows, "img", "label", CIFAR10_NAMES)
    return train_x, train_y


def batch(name, labels_key, x, y):
    return {b"batch_label": name, labels_key.encode(): y,
            b"data": x.reshape(len(x), 3072), b"filenames": [f"img_{i}.png" for i in range(len(x))]}


def write_binary(path, x, label_bytes):
    with open(path, "wb") as f:
        for img, lb in zip(x, label_bytes):
            f.write(bytes(lb) + img.tobytes())


def cifar100():
    train_x, test_x = images(10, 3), images(5, 4)
    train_y = sorted(int(v) for v in np.random.default_rng(5).choice(100, 10, replace=False))
    test_y = sorted(int(v) for v in np.random.default_rng(6).choice(train_y, 5, replace=False))
    coarse = lambda y: [l // 5 for l in y]

    binary = mkdir("cifar100-bin", "cifar-100-binary")
    write_binary(os.path.join(binary, "train.bin"), train_x, [[c, l] for c, l in zip(coarse(train_y), train_y)])
    write_binary(os.path.join(binary, "test.bin"), test_x, [[c, l] for c, l in zip(coarse(test_y), test_y)])
    with open(os.path.join(binary, "fine_label_names.txt"), "w") as f:
        f.write("\n".join(CIFAR100_NAMES) + "\n")

    py = mkdir("cifar100-py", "cifar-100-python")
    for split, x, y in [("train", train_x, train_y), ("test", test_x, test_y)]:
        obj = {b"filenames": [f"f{i}.png" for i in range(len(x))], b"batch_label": f"{split}ing batch 1 of 1",
               b"fine_labels": y, b"coarse_labels": coarse(y), b"data": x.reshape(len(x), 3072)}
        write_pickle(os.path.join(py, split), obj)
    write_pickle(os.path.join(py, "meta"),
                 {b"fine_label_names": CIFAR100_NAMES, b"coarse_label_names": [f"coarse_{i}" for i in range(20)]})


# ---- parquet ----------------------------------------------------------------

def png(img):
    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(img):
    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def hf_metadata(image_col, label_col, names):
    features = {image_col: {"_type": "Image"}}
    if names is not None:
        features[label_col] = {"names": names, "_type": "ClassLabel"}
    else:
        features[label_col] = {"dtype": "int64", "_type": "Value"}
    return json.dumps({"info": {"features": features}})


def write_parquet(path, rows, image_col, label_col, names, extra=None):
    """rows: (encoded image bytes, label, path); as datasets writes an Image
    and a ClassLabel feature."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {
        image_col: pa.array([{"bytes": b, "path": p} for b, _, p in rows], type=image_type),
        label_col: pa.array([l for _, l, _ in rows], type=pa.int64()),
    }
    if extra:
        columns.update(extra)
    table = pa.table(columns)
    table = table.replace_schema_metadata({"huggingface": hf_metadata(image_col, label_col, names)})
    pq.write_table(table, path)


def mixed(train_x, train_y):
    """PNG and JPEG rows, some 40x40; the same files as an image folder."""
    big = images(6, 7)
    big = np.concatenate([big, big[:, :, :8, :]], axis=2)
    big = np.concatenate([big, big[:, :, :, :8]], axis=3)  # 40x40
    names = ["cat", "dog", "fox"]
    rows = {"train": [], "validation": []}
    plan = [("train", train_x[i], i % 3, "png" if i % 2 else "jpg") for i in range(9)]
    plan += [("train", big[i], i % 3, "jpg" if i % 2 else "png") for i in range(3)]
    plan += [("validation", big[3 + i], i, "jpg" if i % 2 else "png") for i in range(3)]
    for split, img, label, fmt in plan:
        data = png(img) if fmt == "png" else jpeg(img)
        name = f"{len(rows[split]):03d}.{fmt}"
        rows[split].append((data, label, name))
    root = mkdir("hf-mixed")
    for split, rs in rows.items():
        # Sorted by class so that the image folder (class order, then file
        # name) reads them in the same order.
        rs.sort(key=lambda r: (r[1], r[2]))
        write_parquet(os.path.join(root, f"{split}.parquet"), rs, "image", "label", names)
        for data, label, name in rs:
            d = mkdir("hf-mixed-folder", "test" if split == "validation" else split, names[label])
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    write_parquet(os.path.join(root, "unsupervised.parquet"), rows["train"][:1], "image", "label", names)


def small_cifar10(d, train_x):
    """A two-image CIFAR-10 python folder in d (data_batch_1, test_batch, batches.meta)."""
    write_pickle(os.path.join(d, "data_batch_1"), batch("training batch 1 of 1", "labels", train_x[:2], [0, 1]))
    write_pickle(os.path.join(d, "test_batch"), batch("testing batch 1 of 1", "labels", train_x[2:4], [1, 0]))
    write_pickle(os.path.join(d, "batches.meta"), {b"label_names": CIFAR10_NAMES})


def bad(train_x):
    d = mkdir("bad", "pickle-truncated", "cifar-10-batches-py")
    small_cifar10(d, train_x)
    with open(os.path.join(d, "data_batch_1"), "rb") as f:
        data = f.read()
    with open(os.path.join(d, "data_batch_1"), "wb") as f:
        f.write(data[: len(data) // 2])

    d = mkdir("bad", "pickle-global", "cifar-10-batches-py")
    small_cifar10(d, train_x)
    p = Py2Pickler()
    p.glob("os", "system")
    p.string("echo this must never run")
    p.out += b"\x85R"
    with open(os.path.join(d, "data_batch_1"), "wb") as f:
        f.write(bytes(p.out + b"."))

    rows = [(png(train_x[i]), i % 2, f"{i}.png") for i in range(4)]
    d = mkdir("bad", "parquet-no-image", "data")
    for split in ["train", "test"]:
        table = pa.table({"pixels": pa.array([r[0] for r in rows], type=pa.binary()),
                          "label": pa.array([r[1] for r in rows], type=pa.int64())})
        pq.write_table(table, os.path.join(d, f"{split}-00000-of-00001.parquet"))

    d = mkdir("bad", "parquet-bad-label", "data")
    write_parquet(os.path.join(d, "train-00000-of-00001.parquet"), rows, "image", "label", ["a", "b"])
    write_parquet(os.path.join(d, "test-00000-of-00001.parquet"), rows[:2] + [(rows[2][0], 5, "x.png")],
                  "image", "label", ["a", "b"])

    d = mkdir("bad", "parquet-truncated", "data")
    write_parquet(os.path.join(d, "train-00000-of-00001.parquet"), rows, "image", "label", ["a", "b"])
    write_parquet(os.path.join(d, "test-00000-of-00001.parquet"), rows, "image", "label", ["a", "b"])
    path = os.path.join(d, "train-00000-of-00001.parquet")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 100])


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    train_x, train_y = cifar10()
    cifar100()
    mixed(train_x, train_y)
    bad(train_x)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
