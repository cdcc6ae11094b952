"""Peak memory of an inspectflow server while several clients download one file at once.

    .local/venv/bin/python benches/download_memory.py [--what snapshot|model]
        [--bin target/release/inspectflow] [--images 60] [--clients 4] [--weights-mb 300]

Starts `inspectflow serve` on a free port over a temporary data directory, uploads --images
incompressible 1000x700 PNGs (about 2.1 MB each, stored without compression) as normal media,
then has --clients clients download at the same time:
- `snapshot` (default): a snapshot of the media, as Parquet (`GET /api/snapshots/{id}/download`);
- `model`: a PaDiM model trained on the media (64x64 input), exported as a zip
  (`POST .../models/{id}:export`), after its `model.bin` was replaced by --weights-mb of random
  bytes to stand for a large backbone's weights (the export copies the package's files as they
  are, so only their size matters here).
VmRSS of the server is sampled every 10 ms. Reported: the file's size, each client's status and
byte count, the server's RSS before the downloads and its peak during them, and the seconds the
downloads took. The venv is the one benches/e2e_vs_python.sh sets up (numpy and OpenCV encode
the PNGs).
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import cv2
import numpy as np


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def trained_model_export(call, project, data_dir, args):
    """Trains a PaDiM model on the project's media, swaps its weights for --weights-mb of random
    bytes, and returns the path of its export."""
    status, body = call(
        "POST", f"/api/projects/{project}/train",
        json.dumps({"model_name": "padim", "input_size": 64, "name": "bench"}),
        {"Content-Type": "application/json"},
    )
    assert status in (200, 201, 202), (status, body[:200])
    job = json.loads(body)["id"]
    for _ in range(6000):
        status, body = call("GET", f"/api/jobs/{job}")
        state = json.loads(body)["status"]
        if state not in ("pending", "running"):
            break
        time.sleep(0.1)
    assert state == "completed", body[:300]
    status, body = call("GET", f"/api/projects/{project}/models")
    model = json.loads(body)["models"][0]["id"]
    weights = os.path.join(data_dir, "models", model, "model.bin")
    assert os.path.exists(weights), weights
    with open(weights, "wb") as out:
        for _ in range(args.weights_mb):
            out.write(os.urandom(1 << 20))
    return f"/api/projects/{project}/models/{model}:export"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=["snapshot", "model"], default="snapshot")
    parser.add_argument("--bin", default="target/release/inspectflow")
    parser.add_argument("--weights-mb", type=int, default=300)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    port = free_port()

    def call(method, path, body=None, headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    with tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen(
            [args.bin, "serve", "--bind", f"127.0.0.1:{port}", "--data-dir", data_dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(300):
                try:
                    if call("GET", "/health")[0] == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            status, body = call(
                "POST", "/api/projects", json.dumps({"name": "download bench"}),
                {"Content-Type": "application/json"},
            )
            assert status == 201, (status, body[:200])
            project = json.loads(body)["id"]
            noise = np.random.default_rng(0)
            for index in range(args.images):
                pixels = noise.integers(0, 255, (700, 1000, 3), dtype=np.uint8)
                png = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 0])[1].tobytes()
                boundary = "bench" + uuid.uuid4().hex
                form = (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                    f'filename="{index}.png"\r\nContent-Type: image/png\r\n\r\n'
                ).encode() + png + (
                    f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="label"\r\n\r\n'
                    f"normal\r\n--{boundary}--\r\n"
                ).encode()
                status, body = call(
                    "POST", f"/api/projects/{project}/media", form,
                    {"Content-Type": f"multipart/form-data; boundary={boundary}"},
                )
                assert status == 201, (status, body[:200])
            if args.what == "snapshot":
                status, body = call("POST", f"/api/projects/{project}/snapshots", b"",
                                    {"Content-Type": "application/json"})
                assert status == 201, (status, body[:200])
                method, path = "GET", f"/api/snapshots/{json.loads(body)['id']}/download"
            else:
                method, path = "POST", trained_model_export(call, project, data_dir, args)

            def rss_mb():
                with open(f"/proc/{server.pid}/status") as status_file:
                    for line in status_file:
                        if line.startswith("VmRSS"):
                            return int(line.split()[1]) / 1024
                return 0.0

            before = rss_mb()
            peak = [before]
            done = threading.Event()

            def sample():
                while not done.is_set():
                    peak[0] = max(peak[0], rss_mb())
                    time.sleep(0.01)

            results = []

            def download():
                status, body = call(method, path)
                results.append((status, len(body)))

            sampler = threading.Thread(target=sample)
            sampler.start()
            started = time.monotonic()
            clients = [threading.Thread(target=download) for _ in range(args.clients)]
            for client in clients:
                client.start()
            for client in clients:
                client.join()
            took = time.monotonic() - started
            done.set()
            sampler.join()
        finally:
            server.terminate()
            server.wait()
    size = max(length for _, length in results) / 1e6
    print(
        f"{args.bin}: {args.what}, {args.clients} clients, file {size:.0f} MB, "
        f"answers {sorted(results)}, server RSS before {before:.0f} MB, "
        f"peak {peak[0]:.0f} MB, {took:.1f} s"
    )


if __name__ == "__main__":
    main()
