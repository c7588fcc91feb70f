#!/usr/bin/python3
"""Writes the seed inputs under fuzz/corpus/<target>/ (docs/fuzzing.md).

Run with Debian's python3 (python3-torch for the weights seeds):
    /usr/bin/python3 fuzz/make_corpus.py
Every seed is small (a few KB at most) and valid, or valid but for one thing
a parser must reject; the fuzzer mutates from there. It also rebuilds the
saved findings that were made by hand (regression_inputs). Every file comes
out byte for byte the same on each run; files it does not write (findings
saved by scripts/fuzz.sh) are left alone.
"""
import ctypes
import gzip
import io
import json
import os
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def pattern(n, mul=37, add=11):
    return bytes((k * mul + add) & 0xFF for k in range(n))


# ---------------------------------------------------------------- idx
def idx_seeds():
    def images(n, rows, cols):
        return struct.pack(">IIII", 0x803, n, rows, cols) + pattern(n * rows * cols)

    def labels(n):
        return struct.pack(">II", 0x801, n) + bytes(k % 10 for k in range(n))

    put("idx", "images-3x4x5.idx", images(3, 4, 5))
    put("idx", "images-0.idx", images(0, 28, 28))
    put("idx", "images-2x3x3.idx.gz", gzip.compress(images(2, 3, 3), mtime=0))
    put("idx", "labels-7.idx", labels(7))
    put("idx", "labels-0.idx", labels(0))
    put("idx", "labels-12.idx.gz", gzip.compress(labels(12), mtime=0))
    put("idx", "images-truncated.idx", images(3, 4, 5)[:40])
    # 2^22 x 2^21 x 2^21 pixels: the product is 2^64, 0 in 64-bit arithmetic.
    put("idx", "images-size-wraps-2to64.idx", struct.pack(">IIII", 0x803, 1 << 22, 1 << 21, 1 << 21))
    # Two gzip members back to back: zlib reads them as one stream.
    put("idx", "labels-2members.idx.gz",
        gzip.compress(labels(4)[:6], mtime=0) + gzip.compress(labels(4)[6:], mtime=0))


# ---------------------------------------------------------------- image
def png(width, height, color_type, bit_depth, rows, interlace=False, extra=b""):
    """rows: list of raw scanline bytes (no filter byte)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 1 if interlace else 0)
    if interlace:
        raw = adam7(rows, width, height, bits_per_pixel(color_type, bit_depth))
    else:
        raw = b"".join(b"\x00" + r for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(raw, 9)) +
            chunk(b"IEND", b""))


def bits_per_pixel(color_type, bit_depth):
    return {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type] * bit_depth


def adam7(rows, width, height, bpp):
    """Re-lays whole-byte pixels (bpp a multiple of 8) in the 7 Adam7 passes."""
    step = bpp // 8
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    out = b""
    for x0, y0, dx, dy in passes:
        for y in range(y0, height, dy):
            line = b"".join(rows[y][x * step:(x + 1) * step] for x in range(x0, width, dx))
            if line:
                out += b"\x00" + line
    return out


def png_seeds():
    w, h = 5, 4
    grey = [pattern(w, 13, y * 40) for y in range(h)]
    rgb = [pattern(w * 3, 29, y * 17) for y in range(h)]
    put("image", "grey8.png", png(w, h, 0, 8, grey))
    put("image", "rgb8.png", png(w, h, 2, 8, rgb))
    put("image", "rgba8.png", png(w, h, 6, 8, [pattern(w * 4, 7, y) for y in range(h)]))
    put("image", "grey-alpha8.png", png(w, h, 4, 8, [pattern(w * 2, 5, y) for y in range(h)]))
    put("image", "grey16.png", png(w, h, 0, 16, [pattern(w * 2, 91, y) for y in range(h)]))
    put("image", "rgb16.png", png(w, h, 2, 16, [pattern(w * 6, 53, y) for y in range(h)]))
    put("image", "rgb8-interlaced.png", png(9, 9, 2, 8, [pattern(27, 29, y) for y in range(9)], interlace=True))
    # Palette with transparency, 4 bits per index.
    plte = bytes([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    trns = bytes([255, 128, 0])

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    put("image", "palette4-trns.png", png(6, 3, 3, 4, [bytes([0x01, 0x20, 0x12]) for _ in range(3)],
                                          extra=chunk(b"PLTE", plte) + chunk(b"tRNS", trns)))
    put("image", "grey1.png", png(10, 2, 0, 1, [b"\xa5\x40", b"\x5a\x80"]))
    put("image", "rgb8-truncated.png", png(w, h, 2, 8, rgb)[:-30])


def jpeg_seeds():
    try:
        tj = ctypes.CDLL("libturbojpeg.so.0")
    except OSError:
        print("make_corpus: libturbojpeg.so.0 not found, no JPEG seeds", file=sys.stderr)
        return
    tj.tjInitCompress.restype = ctypes.c_void_p
    tj.tjCompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ulong),
                               ctypes.c_int, ctypes.c_int, ctypes.c_int]
    tj.tjFree.argtypes = [ctypes.c_void_p]
    tj.tjDestroy.argtypes = [ctypes.c_void_p]
    TJPF_RGB, TJPF_GRAY, TJPF_CMYK = 0, 6, 11
    TJSAMP_444, TJSAMP_420, TJSAMP_GRAY = 0, 2, 3
    TJFLAG_PROGRESSIVE = 16384

    def jpeg(w, h, pf, channels, subsamp, quality, flags=0):
        pixels = pattern(w * h * channels, 31, 5)
        handle = tj.tjInitCompress()
        buf, size = ctypes.c_void_p(), ctypes.c_ulong(0)
        rc = tj.tjCompress2(handle, pixels, w, 0, h, pf, ctypes.byref(buf), ctypes.byref(size), subsamp,
                            quality, flags)
        assert rc == 0, "tjCompress2 failed"
        data = ctypes.string_at(buf, size.value)
        tj.tjFree(buf)
        tj.tjDestroy(handle)
        return data

    put("image", "rgb444.jpg", jpeg(8, 8, TJPF_RGB, 3, TJSAMP_444, 90))
    put("image", "rgb420.jpg", jpeg(17, 9, TJPF_RGB, 3, TJSAMP_420, 50))
    put("image", "grey.jpg", jpeg(7, 5, TJPF_GRAY, 1, TJSAMP_GRAY, 75))
    put("image", "rgb-progressive.jpg", jpeg(16, 16, TJPF_RGB, 3, TJSAMP_420, 80, TJFLAG_PROGRESSIVE))
    put("image", "cmyk.jpg", jpeg(8, 8, TJPF_CMYK, 4, TJSAMP_444, 90))
    put("image", "rgb444-truncated.jpg", jpeg(8, 8, TJPF_RGB, 3, TJSAMP_444, 90)[:-40])


# ---------------------------------------------------------------- weights
def weights_seeds():
    try:
        import torch
    except ImportError:
        print("make_corpus: no torch module (install python3-torch), no weights seeds", file=sys.stderr)
        return

    def saved(obj, protocol=2):
        buf = io.BytesIO()
        torch.save(obj, buf, pickle_protocol=protocol)
        return buf.getvalue()

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    bn = torch.nn.BatchNorm1d(2)
    sd = OrderedDict(list(lin.state_dict().items()) + [("bn." + k, v) for k, v in bn.state_dict().items()])
    put("weights", "linear-bn-state-dict.pt", saved(sd))
    put("weights", "wrapped-state-dict.pt", saved({"state_dict": lin.state_dict(), "epoch": 3, "lr": 0.1}))
    put("weights", "module-prefix.pt", saved(OrderedDict(("module." + k, v) for k, v in lin.state_dict().items())))
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    put("weights", "views-dtypes.pt", saved({
        "t": base.t(), "row": base[1], "same": base, "half": base.half(), "bool": base > 5,
        "long": torch.arange(3), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2)), "bf16": torch.ones(2, dtype=torch.bfloat16),
    }, protocol=4))
    put("weights", "no-tensors.pt", saved({"a": 1, "b": [1.5, "x", None, True], "c": (1, 2)}))

    # Bare data.pkl streams (the harness wraps them into an archive whose
    # data/0 .. data/7 hold 64, 16, 8, 256, 3, 0, 24, 1024 bytes): tensors
    # sized to fit those records.
    fitted = OrderedDict([
        ("w0", torch.zeros(4, 4)), ("w1", torch.zeros(4)), ("w2", torch.zeros(1, dtype=torch.int64)),
        ("w3", torch.zeros(8, 8)), ("w4", torch.zeros(3, dtype=torch.uint8)), ("w5", torch.zeros(0)),
        ("w6", torch.zeros(3, dtype=torch.float64)), ("w7", torch.zeros(16, 16).t()),
    ])
    for protocol in (1, 2, 4):
        with zipfile.ZipFile(io.BytesIO(saved(fitted, protocol))) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
            put("weights", "fitted-p%d.pkl" % protocol, z.read(pkl))
    # Protocol 0 (text opcodes): rejected at its persistent id, but it brings
    # the text INT / LONG / GLOBAL opcodes into the corpus.
    with zipfile.ZipFile(io.BytesIO(saved(OrderedDict([("w1", torch.zeros(4))]), 0))) as z:
        put("weights", "fitted-p0.pkl", z.read([n for n in z.namelist() if n.endswith("/data.pkl")][0]))


# ---------------------------------------------------------------- results
def results_seeds():
    def epoch(k, comm):
        e = {"epoch": k, "train_loss": 1.0 / k, "train_accuracy": 0.5 + 0.1 * k, "train_time": 12.5,
             "train_throughput": 4800.0, "avg_batch_time": 0.013, "val_loss": 0.9 / k, "val_accuracy": 0.55 + 0.1 * k,
             "pipeline": {"stall_fraction": 0.02, "data_busy_pct": 40.0, "model_busy_pct": 95.5,
                          "mean_buffer_fill": 3.5, "bad_samples": 0}}
        e.update(comm)
        return e

    def run(method, world, comm, summary_comm, **extra):
        doc = {"method": method, "world_size": world, "batch_size": 64,
               "start_time": "2024-05-01T10:00:00Z", "end_time": "2024-05-01T10:05:00Z",
               "config": {"model": "cnn", "epochs": 2},
               "epochs": [epoch(1, comm), epoch(2, comm)],
               "summary": dict({"avg_train_throughput": 4800.0, "avg_train_time_per_epoch": 12.5,
                                "best_val_accuracy": 0.75}, **summary_comm),
               "all_losses": [2.3, 1.7, None, 0.9],
               "timeline": [{"t": 0.0, "buffer_fill": 0, "data_busy": 0.1, "model_busy": 0.9},
                            {"t": 0.5, "buffer_fill": 4, "data_busy": 0.4, "model_busy": 0.95}]}
        doc.update(extra)
        return json.dumps(doc, indent=1).encode()

    ddp = run("baseline_ddp", 2, {"avg_comm_time": 0.004, "avg_comm_wait": 0.001}, {"avg_comm_time": 0.004})
    ring = run("all_reduce", 2, {"avg_comm_time": 0.005}, {})
    ps = run("ps", 3, {"avg_comm_time_pull": 0.002, "avg_comm_time_push": 0.003},
             {"avg_comm_time_pull": 0.002, "avg_comm_time_push": 0.003}, num_workers=2)
    put("results", "ddp.json", ddp)
    put("results", "ring.json", ring)
    put("results", "ps.json", ps)
    put("results", "three-runs.json", b"\x00".join([ddp, ring, ps]))
    put("results", "same-method-twice.json", b"\x00".join([ddp, run("baseline_ddp", 2, {}, {}, batch_size=32)]))
    percent = json.loads(ring)
    percent["summary"]["best_val_accuracy"] = 75.0
    percent["method"] = "custom\tmethod"
    put("results", "percent-accuracy.json", json.dumps(percent).encode())
    missing = json.loads(ddp)
    del missing["epochs"][1]["val_loss"]
    put("results", "missing-field.json", json.dumps(missing).encode())
    put("results", "minimal.json", json.dumps({
        "method": "m", "world_size": 1, "batch_size": 1,
        "epochs": [{"epoch": 0, "train_loss": 0, "train_accuracy": 0, "train_time": 0, "train_throughput": 0,
                    "val_loss": 0, "val_accuracy": 0}],
        "summary": {"avg_train_throughput": 0, "avg_train_time_per_epoch": 0, "best_val_accuracy": 0}}).encode())


# ---------------------------------------------------------------- manifest
def manifest_seeds():
    def manifest(**over):
        doc = {"format": "tandem-checkpoint", "version": 1, "step": 42, "created": "2024-05-01T12:00:00Z",
               "meta": {"epoch": 3, "method": "ring", "lr": 0.05, "world_size": 2, "note": "caf\u00e9 \u2713",
                        "nested": {"a": [1, 2.5, None, True, {"b": "c"}]}},
               "files": [{"name": "model.pt", "bytes": 12345, "xxh64": "0123456789abcdef"},
                         {"name": "optimizer.pt", "bytes": 0, "xxh64": "ef46db3751d8e999"},
                         {"name": "rng.bin", "bytes": 18446744073709551615, "xxh64": "FFFFFFFFFFFFFFFF"}]}
        doc.update(over)
        return doc

    def text(doc, indent=2):
        return (json.dumps(doc, indent=indent, ensure_ascii=False) + "\n").encode()

    put("manifest", "manifest.json", text(manifest()))
    put("manifest", "compact.json", text(manifest(meta={}, files=[]), indent=None))
    put("manifest", "step-max.json", text(manifest(step=9223372036854775807, files=[])))
    put("manifest", "version-2.json", text(manifest(version=2)))
    put("manifest", "bad-name.json", text(manifest(files=[{"name": "../x", "bytes": 1, "xxh64": "0" * 16}])))
    put("manifest", "twice.json", text(manifest(files=[{"name": "a", "bytes": 1, "xxh64": "0" * 16}] * 2)))
    put("manifest", "deep-meta.json", text(manifest(meta={"d": json.loads("[" * 60 + "]" * 60)})))


# ---------------------------------------------------------------- regressions
def regression_inputs():
    """The findings made by hand (docs/fuzzing.md, "Findings"), rebuilt here so
    that their structure can be read; the ones libFuzzer found are saved as it
    wrote them (<kind>-<target>-<sha1 prefix>)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # A 68-byte PNG whose header claims 1000000 x 1000000 RGBA: 4 TB asked for
    # before any pixel is read.
    ihdr = struct.pack(">IIBBBBB", 1000000, 1000000, 8, 6, 0, 0, 0)
    put("image", "oom-image-png-header-1000000x1000000",
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) +
        chunk(b"IEND", b""))
    # The 8x8 JPEG seed with its SOF0 saying 60000 x 60000 (730 bytes, so the
    # target asks for 1 channel: 3.6 GB).
    jpeg = bytearray(open(os.path.join(ROOT, "image", "rgb444.jpg"), "rb").read())
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    put("image", "oom-image-jpeg-header-60000x60000", bytes(jpeg))

    # Bare data.pkl streams (the harness adds the archive).
    def unicode(text):
        return b"X" + struct.pack("<I", len(text)) + text.encode()

    def long8(v):
        return b"\x8a\x08" + struct.pack("<q", v)

    def rebuild(key, offset, size, stride):
        pid = b"(" + unicode("storage") + b"ctorch\nFloatStorage\n" + unicode(key) + unicode("cpu") + b"K\x10tQ"
        return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + long8(offset) +
                b"(" + b"".join(long8(v) for v in size) + b"t(" + b"".join(long8(v) for v in stride) + b"t" +
                b"\x89ccollections\nOrderedDict\n)RtR")

    def state_dict(**tensors):
        return b"\x80\x02}(" + b"".join(unicode(k) + v for k, v in tensors.items()) + b"u."

    # (size - 1) * stride and offset + extent overflow int64 (UBSan).
    put("weights", "crash-weights-extent-overflow", state_dict(w=rebuild("0", 0, [1 << 62, 2], [1 << 62, 1])))
    put("weights", "crash-weights-offset-overflow", state_dict(w=rebuild("0", (1 << 63) - 1, [2], [1])))
    # A list that APPENDs itself through the memo: a shared_ptr cycle (leak).
    put("weights", "leak-weights-list-appends-itself",
        b"\x80\x02]q\x00h\x00a0" + state_dict(w=rebuild("0", 0, [4], [1]))[2:])
    # 100000 nested 1-tuples (TUPLE1 per byte): the destructors recurse 100000 deep.
    put("weights", "crash-weights-nested-100000-deep", b"\x80\x02]" + b"\x85" * 100000 + b".")
    # _rebuild_from_type_v2(_rebuild_from_type_v2, None, (...)) 20000 deep: call() recurses.
    depth = 20000
    put("weights", "crash-weights-rebuild-chain-20000-deep",
        b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\nq\x00h\x00" + b"h\x00N" * depth + b")" +
        b"\x87" * depth + b"R.")


def main():
    idx_seeds()
    png_seeds()
    jpeg_seeds()
    weights_seeds()
    results_seeds()
    manifest_seeds()
    regression_inputs()


if __name__ == "__main__":
    main()
