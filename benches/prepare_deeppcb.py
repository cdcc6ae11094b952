#!/usr/bin/env python3
"""Lays DeepPCB out as an anomaly dataset: templates are normal, tests are anomalous, defect
boxes become masks. Pairs alternate between training (template only) and test (template as a
normal test image, test image as an anomalous one), so no board is both trained on and tested.

    benches/prepare_deeppcb.py DEEPPCB_DIR OUT_DIR

Writes OUT_DIR/{train/normal,test/normal,test/anomalous,masks}; images are symlinks, masks PNG.
Standard library only."""
import pathlib
import struct
import sys
import zlib


def write_grey_png(path, width, height, rows):
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + bytes(row) for row in rows)
    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6))
    png += chunk(b"IEND", b"")
    path.write_bytes(png)


def jpeg_size(path):
    data = path.read_bytes()
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    raise ValueError(f"{path}: no JPEG frame header")


def main():
    source, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    for folder in ("train/normal", "test/normal", "test/anomalous", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    templates = sorted(source.glob("group*/*/*_temp.jpg"))
    counts = {"train": 0, "test": 0}
    for index, template in enumerate(templates):
        stem = template.name[: -len("_temp.jpg")]
        test = template.with_name(f"{stem}_test.jpg")
        boxes = template.parent.parent / f"{template.parent.name}_not" / f"{stem}.txt"
        if not test.exists() or not boxes.exists():
            continue
        if index % 2 == 0:
            (out / "train/normal" / template.name).symlink_to(template.resolve())
            counts["train"] += 1
            continue
        (out / "test/normal" / template.name).symlink_to(template.resolve())
        (out / "test/anomalous" / test.name).symlink_to(test.resolve())
        width, height = jpeg_size(test)
        mask = [bytearray(width) for _ in range(height)]
        for line in boxes.read_text().split("\n"):
            values = line.replace(",", " ").split()
            if len(values) < 4:
                continue
            x1, y1, x2, y2 = (int(v) for v in values[:4])
            for y in range(max(0, y1), min(height, y2)):
                mask[y][max(0, x1) : min(width, x2)] = b"\xff" * (min(width, x2) - max(0, x1))
        write_grey_png(out / "masks" / f"{test.stem}.png", width, height, mask)
        counts["test"] += 1
    print(f"deeppcb: {counts['train']} training templates, {counts['test']} test pairs -> {out}")


if __name__ == "__main__":
    main()
