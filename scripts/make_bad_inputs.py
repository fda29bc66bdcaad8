"""The bad-input corpus of tests/bad_inputs/ (read by tests/bad_inputs.rs).

    python3 scripts/make_bad_inputs.py [OUT_DIR]

Standard library only. Writes a micro ViT teacher in the engine's format
(micro_teacher.safetensors: 8 px, patch 4, width 8, one block, 10 classes)
and, derived from it or from scratch, one small file or folder per way an
input can be wrong: empty, garbage, truncated and inconsistent checkpoints,
wrong shapes and dtypes, offsets past the end, missing keys, NaN, bad
metadata; truncated and mislabelled CIFAR files; image folders with
non-images, empty class folders, unknown classes; bad model configs and
results files. cases.json (written by hand, not by this script) says for
each case the command line, the error it must give and the exit code.
"""
import json
import os
import random
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "tests", "bad_inputs")

CONFIG = {"image_size": 8, "channels": 3, "patch": 4, "width": 8, "depth": 1, "heads": 2, "mlp": 16, "classes": 10, "ln_eps": 1e-6}
RUN = {"role": "teacher", "normalize": "half", "data": None, "loss": None, "teacher": None, "factor_init": None,
       "fit": None, "optimizer": None, "epoch": None, "metrics": None}


def shapes(cfg):
    d, m, c, p = cfg["width"], cfg["mlp"], cfg["classes"], cfg["patch"]
    t = (cfg["image_size"] // p) ** 2 + 1
    out = [("patch_embed.proj.weight", [d, cfg["channels"], p, p]), ("patch_embed.proj.bias", [d]),
           ("cls_token", [1, 1, d]), ("pos_embed", [1, t, d])]
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        out += [(b + "norm1.weight", [d]), (b + "norm1.bias", [d]), (b + "attn.qkv.weight", [3 * d, d]),
                (b + "attn.qkv.bias", [3 * d]), (b + "attn.proj.weight", [d, d]), (b + "attn.proj.bias", [d]),
                (b + "norm2.weight", [d]), (b + "norm2.bias", [d]), (b + "mlp.fc1.weight", [m, d]),
                (b + "mlp.fc1.bias", [m]), (b + "mlp.fc2.weight", [d, m]), (b + "mlp.fc2.bias", [d])]
    out += [("norm.weight", [d]), ("norm.bias", [d]), ("head.weight", [c, d]), ("head.bias", [c])]
    return out


def values(name, n, rng):
    if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
        return [1.0] * n
    return [rng.gauss(0.0, 0.2) for _ in range(n)]


def safetensors(tensors, metadata):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header, offset, blobs = {}, 0, []
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def teacher_tensors(cfg, rng):
    out = []
    for name, shape in shapes(cfg):
        n = 1
        for s in shape:
            n *= s
        out.append((name, "F32", shape, struct.pack(f"<{n}f", *values(name, n, rng))))
    return out


def metadata(cfg=CONFIG, ranks=None):
    ranks = ranks if ranks is not None else [[None] * 6 for _ in range(cfg["depth"])]
    return {"format": "effrank-engine", "config": json.dumps(cfg), "ranks": json.dumps(ranks), "run": json.dumps(RUN)}


def tiny_png():
    """A valid 2x2 RGB PNG, built with zlib and crc32."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + bytes([40 * y, 80 * x, 120]) * 1 + bytes([40 * y, 80 * x + 1, 120]) for y in range(2) for x in range(1))
    ihdr = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def write(name, data):
    path = os.path.join(OUT, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def replace(tensors, name, new):
    return [new if t[0] == name else t for t in tensors]


def main():
    rng = random.Random(7)
    os.makedirs(OUT, exist_ok=True)
    good = teacher_tensors(CONFIG, rng)
    whole = safetensors(good, metadata())
    write("micro_teacher.safetensors", whole)

    # Checkpoints.
    write("checkpoint_empty.safetensors", b"")
    write("checkpoint_garbage.safetensors", b"this is not a checkpoint\n" * 4)
    write("checkpoint_truncated.safetensors", whole[: len(whole) - 100])
    write("checkpoint_header_cut.safetensors", whole[:40])
    bad = bytearray(whole)
    header_len = struct.unpack("<Q", whole[:8])[0]
    header = json.loads(whole[8:8 + header_len])
    header["head.bias"]["data_offsets"] = [10 ** 9, 10 ** 9 + 40]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    write("checkpoint_offsets_past_end.safetensors", struct.pack("<Q", len(text)) + text + whole[8 + header_len:])
    write("checkpoint_wrong_shape.safetensors", safetensors(replace(good, "head.weight", ("head.weight", "F32", [10, 7], struct.pack("<70f", *[0.0] * 70))), metadata()))
    write("checkpoint_wrong_dtype.safetensors", safetensors(replace(good, "head.bias", ("head.bias", "I64", [10], struct.pack("<10q", *range(10)))), metadata()))
    write("checkpoint_missing_key.safetensors", safetensors([t for t in good if t[0] != "norm.weight"], metadata()))
    write("checkpoint_extra_key.safetensors", safetensors(good + [("stray.weight", "F32", [2], struct.pack("<2f", 1.0, 2.0))], metadata()))
    nan = struct.pack("<10f", *([0.0] * 3 + [float("nan")] + [0.0] * 6))
    write("checkpoint_nan.safetensors", safetensors(replace(good, "head.bias", ("head.bias", "F32", [10], nan)), metadata()))
    write("checkpoint_bad_config.safetensors", safetensors(good, metadata(dict(CONFIG, heads=3))))
    write("checkpoint_bad_ranks.safetensors", safetensors(good, metadata(ranks=[[None] * 5])))
    write("checkpoint_bad_run.safetensors", safetensors(good, dict(metadata(), run="{\"role\": 3}")))
    write("not_a_checkpoint.json", b"{\"hello\": 1}\n")

    # CIFAR-100 folders (3074-byte records: coarse, fine, 3072 pixels).
    def record(fine):
        return bytes([0, fine]) + bytes(rng.randrange(256) for _ in range(3072))
    write("cifar_truncated/train.bin", record(1) + record(2) + record(3)[:1000])
    write("cifar_truncated/test.bin", record(4))
    write("cifar_bad_label/train.bin", record(1) + record(120))
    write("cifar_bad_label/test.bin", record(4))
    write("cifar_no_test/train.bin", record(1))
    write("cifar_empty/train.bin", b"")
    write("cifar_empty/test.bin", record(1))

    # Image folders.
    png = tiny_png()
    for split in ["train", "test"]:
        write(f"folder_non_image/{split}/a/good.png", png)
        write(f"folder_non_image/{split}/b/good.png", png)
    write("folder_non_image/train/a/broken.png", b"a text file named like an image\n")
    write("folder_empty_class/train/a/good.png", png)
    os.makedirs(os.path.join(OUT, "folder_empty_class/train/b"), exist_ok=True)
    write("folder_empty_class/train/b/.keep", b"")
    write("folder_empty_class/test/a/good.png", png)
    write("folder_unknown_class/train/a/good.png", png)
    write("folder_unknown_class/test/zebra/good.png", png)
    os.makedirs(os.path.join(OUT, "folder_no_classes/train"), exist_ok=True)
    write("folder_no_classes/train/readme.txt", b"no class folders here\n")
    os.makedirs(os.path.join(OUT, "folder_no_classes/test"), exist_ok=True)
    write("folder_no_classes/test/readme.txt", b"no class folders here\n")

    # Model configs.
    write("config_heads.json", json.dumps(dict(CONFIG, heads=3)).encode())
    write("config_huge.json", json.dumps(dict(CONFIG, image_size=1 << 40, patch=1)).encode())
    write("config_not_json.json", b"image_size = 8\n")
    write("config_missing_field.json", json.dumps({k: v for k, v in CONFIG.items() if k != "width"}).encode())

    # Results for analyze.
    write("points_nan.csv", b"rank,accuracy\n2,0.3\n4,nan\n8,0.7\n")
    write("points_duplicate.csv", b"rank,accuracy\n2,0.3\n4,0.5\n4,0.6\n")
    write("points_zero_rank.csv", b"rank,accuracy\n0,0.3\n4,0.5\n")
    write("points_one_rank.csv", b"rank,accuracy\n4,0.5\n")
    write("results_malformed/results.jsonl",
          b'{"kind":"teacher","top1":0.9,"top5":0.99,"params":1000}\n{"kind":"student","rank":2}\n')
    write("a_file.txt", b"a file where a folder is expected\n")
    print(f"wrote the bad-input corpus into {os.path.abspath(OUT)}")


if __name__ == "__main__":
    main()
