"""PyTorch checkpoints for the tests of src/model/pth.rs (the .pth reader).

    pip install --target /tmp/torchdeps torch safetensors
    PYTHONPATH=/tmp/torchdeps python3 scripts/make_pth_reference.py [OUT_DIR]

OUT_DIR defaults to tests/data (next to this script's parent). Reads
OUT_DIR/torchvision_tiny.safetensors (written by scripts/make_reference.py),
or the one in tests/data when OUT_DIR has none, and writes into OUT_DIR:
  torchvision_tiny.pth   torch.save of an OrderedDict with exactly the tensors
                         of torchvision_tiny.safetensors (same names, dtypes,
                         key order) and a module-style `_metadata`, so the
                         Rust test can demand bit-identical tensors
  pth_dtypes.pth         float32, float16, bfloat16, a transposed view, a row
                         slice (storage offset), a column slice (stride), a
                         broadcast (stride 0), a 0-dim scalar, an empty
                         tensor and two tensors sharing one storage
  pth_dtypes.json        the expected shape and values of each of them
  pth_checkpoint.pth     a training checkpoint: {"model": state_dict,
                         "optimizer": ..., "epoch": ...}
  pth_nocrc.pth          a state_dict saved with CRC-32 disabled
                         (torch.serialization.set_crc32_options(False))
  pth_forbidden.pth      a torch zip archive whose data.pkl calls os.system
                         on load: the reader must refuse it, not run it
  pth_legacy.pt          a state_dict in torch's pre-1.6 (non-zip) format
"""
import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "tests", "data")


def read_safetensors_ordered(path):
    """The tensors of a safetensors file, in the order of its header."""
    from safetensors import safe_open

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n), object_pairs_hook=collections.OrderedDict)
    names = [k for k in header if k != "__metadata__"]
    out = collections.OrderedDict()
    with safe_open(path, framework="pt") as f:
        for k in names:
            out[k] = f.get_tensor(k)
    return out


def module_metadata(names):
    """What nn.Module.state_dict() attaches as `_metadata`: a version per
    module prefix (here the prefixes of the tensor names)."""
    meta = collections.OrderedDict()
    meta[""] = {"version": 1}
    for name in names:
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            meta.setdefault(".".join(parts[:i]), {"version": 1})
    return meta


def torchvision_tiny(out, src):
    sd = read_safetensors_ordered(src)
    sd._metadata = module_metadata(sd.keys())
    torch.save(sd, os.path.join(out, "torchvision_tiny.pth"))


def dtype_tensors():
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    w = randn(3, 5)
    rows = randn(8, 3)
    shared = randn(12)
    h = randn(4, 2).half()
    sd = collections.OrderedDict()
    sd["f32"] = randn(3, 4)
    sd["f16"] = randn(5).half()
    sd["bf16"] = randn(2, 3).bfloat16()
    sd["w_t"] = w.t()  # a view with strides (1, 5), saved without .contiguous()
    sd["h_t"] = h.t()  # the same in float16
    sd["rows"] = rows[2:5]  # storage offset 6
    sd["col"] = rows[:, 1]  # storage offset 1, stride 3
    sd["expanded"] = randn(3, 1).expand(3, 4)  # stride 0
    sd["scalar"] = torch.tensor(3.25)
    sd["empty"] = torch.zeros(0, 3)
    sd["shared_a"] = shared.view(3, 4)
    sd["shared_b"] = shared[4:8]  # same storage as shared_a
    assert not sd["w_t"].is_contiguous() and sd["rows"].storage_offset() == 6
    assert sd["shared_a"].untyped_storage().data_ptr() == sd["shared_b"].untyped_storage().data_ptr()
    return sd


def write_dtypes(out):
    sd = dtype_tensors()
    torch.save(sd, os.path.join(out, "pth_dtypes.pth"))
    expected = collections.OrderedDict()
    for k, t in sd.items():
        expected[k] = {
            "dtype": str(t.dtype).replace("torch.", ""),
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "storage_offset": t.storage_offset(),
            # float16/bfloat16 -> float32 -> Python float are all exact
            "values": t.float().flatten().tolist(),
        }
    with open(os.path.join(out, "pth_dtypes.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


def write_checkpoint(out):
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4, generator=g)).sum().backward()
    opt.step()
    ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "best_acc": 0.5, "note": "tiny"}
    torch.save(ck, os.path.join(out, "pth_checkpoint.pth"))


def write_nocrc(out):
    sd = collections.OrderedDict(w=torch.arange(6.0).view(2, 3), b=torch.tensor([0.5, -1.0]))
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(sd, os.path.join(out, "pth_nocrc.pth"))
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(os.path.join(out, "pth_nocrc.pth")) as z:
        assert all(i.CRC == 0 for i in z.infolist() if i.file_size > 0), "CRC-32 still written"


class Evil:
    """Unpickling this runs a shell command (pickle calls os.system)."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def write_forbidden(out):
    buf = io.BytesIO()
    torch.save(collections.OrderedDict(weight=torch.zeros(2)), buf)
    path = os.path.join(out, "pth_forbidden.pth")
    payload = pickle.dumps(collections.OrderedDict(weight=Evil()), protocol=2)
    assert b"system" in payload
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            name = "pth_forbidden/" + info.filename.split("/", 1)[1]
            data = payload if name.endswith("/data.pkl") else src.read(info)
            dst.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data, zipfile.ZIP_STORED)
    # torch's own safe loader refuses it too (never load it with weights_only=False).
    try:
        torch.load(path, weights_only=True)
        raise SystemExit("torch.load(weights_only=True) accepted pth_forbidden.pth")
    except pickle.UnpicklingError as e:
        assert "system" in str(e), e


def write_legacy(out):
    sd = collections.OrderedDict(w=torch.arange(4.0), b=torch.ones(2))
    torch.save(sd, os.path.join(out, "pth_legacy.pt"), _use_new_zipfile_serialization=False)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    os.makedirs(out, exist_ok=True)
    src = os.path.join(out, "torchvision_tiny.safetensors")
    if not os.path.exists(src):
        src = os.path.join(DEFAULT_OUT, "torchvision_tiny.safetensors")
    torchvision_tiny(out, src)
    write_dtypes(out)
    write_checkpoint(out)
    write_nocrc(out)
    write_forbidden(out)
    write_legacy(out)
    # What torch itself reads back must match what was meant to be written.
    tv = torch.load(os.path.join(out, "torchvision_tiny.pth"), weights_only=True)
    ref = read_safetensors_ordered(src)
    assert list(tv) == list(ref) and all(torch.equal(tv[k], ref[k]) and tv[k].dtype == ref[k].dtype for k in ref)
    names = ["torchvision_tiny.pth", "pth_dtypes.pth", "pth_dtypes.json", "pth_checkpoint.pth", "pth_nocrc.pth", "pth_forbidden.pth", "pth_legacy.pt"]
    for name in names:
        print(f"wrote {os.path.join(out, name)} ({os.path.getsize(os.path.join(out, name))} bytes)")


if __name__ == "__main__":
    main()
