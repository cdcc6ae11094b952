#!/usr/bin/env python3
"""Best-effort Python/OpenCV peer of inspectflow's inspection chain, for benches/e2e_vs_python.sh.

The same job as the inspectflow graph the benchmark runs, written the way a careful Python
engineer would write it with OpenCV and OpenVINO:

  decode (cv2.VideoCapture, FFmpeg, BGR frames)
  -> cv2.resize to the model's input (INTER_LINEAR), cv2.dnn.blobFromImage to RGB float NCHW in
     [0, 1] (inspectflow's IR holds the ImageNet normalisation itself)
  -> OpenVINO AsyncInferQueue, THROUGHPUT hint, as many jobs as the compiled model's
     OPTIMAL_NUMBER_OF_INFER_REQUESTS, f32 unless told otherwise
  -> a callback that hands the outputs to 2 post-processing threads, which normalise the anomaly
     map and score with the package's statistics (operators/src/package.rs and
     operators/src/transform/anomaly.rs: (raw - threshold) / (max - min) + 0.5, clipped to [0, 1]),
     colour the map (cv2.applyColorMap JET) at the model's resolution, resize it to the frame
     (INTER_LINEAR), blend it over the frame (cv2.addWeighted, alpha 0.4), encode JPEG
     (cv2.imencode, quality 95) and write one file per frame.

With --realtime the clip is read at its own frame rate, like a camera: a reader thread releases
frame i at start + i / fps into a queue of 4 that drops its oldest frame when full (what
inspectflow's live edges do), and the latency from that moment ("capture") to the file being
written is reported as p50/p99.

Prints one JSON line: frames written, seconds (first frame read to last file written, after the
model is compiled), fps, latency percentiles (realtime only), peak RSS (MB, getrusage).
"""

import argparse
import collections
import json
import math
import os
import queue
import resource
import sys
import threading
import time

import cv2
import numpy as np
import openvino as ov


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model.xml of an inspectflow model package")
    parser.add_argument("--video", required=True, help="the clip")
    parser.add_argument("--out", required=True, help="folder for one JPEG per frame (created)")
    parser.add_argument("--realtime", action="store_true",
                        help="pace reading at the clip's FPS and report capture-to-file latency")
    parser.add_argument("--manifest", help="the package's manifest.json (default: beside the model)")
    parser.add_argument("--requests", type=int, default=0,
                        help="AsyncInferQueue jobs (default: OPTIMAL_NUMBER_OF_INFER_REQUESTS)")
    parser.add_argument("--hint", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--precision", default="f32",
                        help="INFERENCE_PRECISION_HINT (f32 like inspectflow's default; bf16, ...)")
    parser.add_argument("--post-threads", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.4)
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--queue", type=int, default=4,
                        help="realtime: frames waiting between the reader and inference")
    parser.add_argument("--max-frames", type=int, default=0, help="stop after this many (0: all)")
    parser.add_argument("--cv-threads", type=int, default=-1,
                        help="cv2.setNumThreads (default: OpenCV's own choice, all cores)")
    return parser.parse_args()


class DropOldestQueue:
    """A bounded queue whose put never blocks: a full queue loses its oldest item."""

    def __init__(self, capacity):
        self.items = collections.deque()
        self.capacity = capacity
        self.cond = threading.Condition()
        self.closed = False
        self.dropped = 0

    def put(self, item):
        with self.cond:
            if len(self.items) >= self.capacity:
                self.items.popleft()
                self.dropped += 1
            self.items.append(item)
            self.cond.notify()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def get(self):
        """The oldest item, or None once closed and empty."""
        with self.cond:
            while not self.items and not self.closed:
                self.cond.wait()
            return self.items.popleft() if self.items else None


def percentile(values, q):
    """Nearest rank (the rule inspectflow's histograms use, without their 6% buckets)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def main():
    args = parse_args()
    manifest_path = args.manifest or os.path.join(os.path.dirname(os.path.abspath(args.model)),
                                                  "manifest.json")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    norm = manifest["normalization"]
    threshold = float(manifest["threshold"])
    # Normalization::apply: ((raw - threshold) / max(max - min, f32::EPSILON) + 0.5).clamp(0, 1).
    spread = max(float(norm["max"]) - float(norm["min"]), float(np.finfo(np.float32).eps))
    raw_threshold = float(norm["threshold"])
    # The map goes straight to 8-bit colour levels: level = clip(raw * a + b, 0, 255), truncated,
    # which is clip(normalised, 0, 1) * 255 truncated, as the heatmap's colour table does.
    map_a = np.float32(255.0 / spread)
    map_b = np.float32((0.5 - raw_threshold / spread) * 255.0)
    size = int(manifest.get("input_size", 256))

    if args.cv_threads >= 0:
        cv2.setNumThreads(args.cv_threads)
    os.makedirs(args.out, exist_ok=True)
    cap = cv2.VideoCapture(args.video, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        sys.exit(f"peer: cannot open {args.video}")
    clip_fps = cap.get(cv2.CAP_PROP_FPS) or 30.0

    core = ov.Core()
    config = {
        "PERFORMANCE_HINT": args.hint.upper(),
        "INFERENCE_PRECISION_HINT": args.precision,
    }
    compiled = core.compile_model(args.model, "CPU", config)
    map_port = compiled.output("anomaly_map")
    score_port = compiled.output("pred_score")
    requests = args.requests or int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    infer_queue = ov.AsyncInferQueue(compiled, requests)

    post_queue = queue.Queue()
    # Frames between "submitted to inference" and "file written": bounds memory like inspectflow's
    # bounded edges, and under --realtime makes a slow chain push back onto the drop-oldest queue.
    in_flight = threading.BoundedSemaphore(requests + 2 * args.post_threads + 4)
    errors = []
    latencies = []
    finished = []  # perf_counter of each written file
    anomalous = [0]
    lock = threading.Lock()

    def on_done(request, userdata):
        try:
            seq, capture, frame = userdata
            amap = request.get_tensor(map_port).data.copy()
            score = float(request.get_tensor(score_port).data.reshape(-1)[0])
            post_queue.put((seq, capture, frame, amap, score))
        except Exception as error:  # noqa: BLE001 - reported at the end, never swallowed
            errors.append(f"callback: {error!r}")
            in_flight.release()

    infer_queue.set_callback(on_done)

    def post_worker():
        encode_params = [cv2.IMWRITE_JPEG_QUALITY, args.quality]
        while True:
            item = post_queue.get()
            if item is None:
                return
            seq, capture, frame, amap, score = item
            try:
                height, width = frame.shape[:2]
                raw = amap.reshape(amap.shape[-2], amap.shape[-1])
                level = np.clip(raw * map_a + map_b, 0, 255).astype(np.uint8)
                colour = cv2.applyColorMap(level, cv2.COLORMAP_JET)
                colour = cv2.resize(colour, (width, height), interpolation=cv2.INTER_LINEAR)
                overlay = cv2.addWeighted(colour, args.alpha, frame, 1.0 - args.alpha, 0.0)
                ok, jpeg = cv2.imencode(".jpg", overlay, encode_params)
                if not ok:
                    raise RuntimeError("imencode failed")
                with open(os.path.join(args.out, f"frame_{seq:08d}.jpg"), "wb") as f:
                    f.write(jpeg.tobytes())
                done = time.perf_counter()
                normalised = min(max((score - raw_threshold) / spread + 0.5, 0.0), 1.0)
                with lock:
                    finished.append(done)
                    latencies.append((done - capture) * 1000.0)
                    anomalous[0] += normalised >= threshold
            except Exception as error:  # noqa: BLE001
                errors.append(f"frame {seq}: {error!r}")
            finally:
                in_flight.release()

    workers = [threading.Thread(target=post_worker, daemon=True) for _ in range(args.post_threads)]
    for worker in workers:
        worker.start()

    def submit(seq, capture, frame):
        small = cv2.resize(frame, (size, size), interpolation=cv2.INTER_LINEAR)
        # BGR u8 HWC -> RGB f32 NCHW in [0, 1], in one C++ call.
        blob = cv2.dnn.blobFromImage(small, scalefactor=1.0 / 255.0, swapRB=True)
        in_flight.acquire()
        infer_queue.start_async(blob, (seq, capture, frame))

    limit = args.max_frames if args.max_frames > 0 else None
    frames_read = 0
    dropped = 0
    started = time.perf_counter()
    if not args.realtime:
        while limit is None or frames_read < limit:
            ok, frame = cap.read()
            if not ok:
                break
            submit(frames_read, time.perf_counter(), frame)
            frames_read += 1
    else:
        frames = DropOldestQueue(args.queue)
        read_count = [0]

        def reader():
            t0 = time.perf_counter()
            i = 0
            try:
                while limit is None or i < limit:
                    ok, frame = cap.read()
                    if not ok:
                        break
                    due = t0 + i / clip_fps
                    wait = due - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    frames.put((i, time.perf_counter(), frame))
                    i += 1
            finally:
                read_count[0] = i
                frames.close()

        reader_thread = threading.Thread(target=reader, daemon=True)
        reader_thread.start()
        while True:
            item = frames.get()
            if item is None:
                break
            submit(*item)
        reader_thread.join()
        frames_read = read_count[0]
        dropped = frames.dropped

    infer_queue.wait_all()
    for _ in workers:
        post_queue.put(None)
    for worker in workers:
        worker.join()
    cap.release()

    written = len(finished)
    seconds = (max(finished) - started) if finished else 0.0
    result = {
        "tool": "python-opencv-openvino",
        "video": args.video,
        "realtime": args.realtime,
        "frames": written,
        "frames_read": frames_read,
        "dropped": dropped,
        "seconds": round(seconds, 4),
        "fps": round(written / seconds, 2) if seconds > 0 else None,
        "anomalous": anomalous[0],
        "requests": requests,
        "hint": args.hint,
        "precision": args.precision,
        "post_threads": args.post_threads,
        "cv_threads": cv2.getNumThreads(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "opencv": cv2.__version__,
        "openvino": ov.get_version(),
        "errors": errors[:5],
    }
    if args.realtime:
        result["latency_ms"] = {
            "p50": round(percentile(latencies, 0.50), 2) if latencies else None,
            "p99": round(percentile(latencies, 0.99), 2) if latencies else None,
            "max": round(max(latencies), 2) if latencies else None,
        }
    print(json.dumps(result), flush=True)
    return 1 if errors or written == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
