#!/usr/bin/env python3
"""Sets up the server demo through the REST API, idempotently, the way a client would:
a project "demo" with 20 normal images, a PaDiM model trained by a job, a video file source
(played in a loop like a camera), a folder sink, and a running pipeline from the three.

Usage: demo_api.py BASE_URL IMAGES_DIR VIDEO RESULTS_DIR
Only the Python standard library is used.
"""
import json
import pathlib
import sys
import time
import urllib.error
import urllib.request
import uuid


def call(base, method, path, body=None, files=None):
    """JSON request; returns (status, parsed body or None)."""
    headers = {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if files is not None:
        boundary = uuid.uuid4().hex
        parts = []
        for name, (filename, content) in files.items():
            disposition = f'form-data; name="{name}"'
            if filename:
                disposition += f'; filename="{filename}"'
            parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode())
            parts.append(content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        data = b"".join(parts)
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        text = error.read()
        return error.code, json.loads(text) if text else None


def expect(result, *statuses):
    status, body = result
    if status not in statuses:
        sys.exit(f"demo: the API answered {status}: {body}")
    return body


def find(items, name):
    return next((item for item in items if item["name"] == name), None)


def main():
    base, images_dir, video, results = sys.argv[1:5]
    projects = expect(call(base, "GET", "/api/projects?limit=1000"), 200)["projects"]
    project = find(projects, "demo") or expect(
        call(base, "POST", "/api/projects", {"name": "demo"}), 201
    )
    pid = project["id"]

    media = expect(call(base, "GET", f"/api/projects/{pid}/media?limit=1000"), 200)
    images = sorted(pathlib.Path(images_dir).glob("*.png"))[:20]
    for image in images[media["pagination"]["total"]:]:
        expect(
            call(base, "POST", f"/api/projects/{pid}/media",
                 files={"file": (image.name, image.read_bytes()), "label": (None, b"normal")}),
            201,
        )

    models = expect(call(base, "GET", f"/api/projects/{pid}/models"), 200)["models"]
    if not models:
        job = expect(call(base, "POST", f"/api/projects/{pid}/train",
                          {"model_name": "padim", "name": "demo"}), 201)
        while job["status"] in ("pending", "running"):
            print(f"demo: training {job['progress']:3d}% {job.get('stage') or ''}", flush=True)
            time.sleep(1)
            job = expect(call(base, "GET", f"/api/jobs/{job['id']}"), 200)
        if job["status"] != "completed":
            sys.exit(f"demo: training {job['status']}: {job.get('message')}")
        models = expect(call(base, "GET", f"/api/projects/{pid}/models"), 200)["models"]
    model = models[-1]

    sources = expect(call(base, "GET", "/api/sources?limit=1000"), 200)["sources"]
    source = find(sources, "demo video") or expect(call(base, "POST", "/api/sources", {
        "name": "demo video", "type": "video_file",
        "config": {"path": video, "loop": True, "realtime": True},
    }), 201)
    sinks = expect(call(base, "GET", "/api/sinks?limit=1000"), 200)["sinks"]
    sink = find(sinks, "demo results") or expect(call(base, "POST", "/api/sinks", {
        "name": "demo results", "type": "folder",
        "config": {"path": results, "create": True, "rate_limit": 2,
                   "output_formats": ["predictions", "image_with_predictions"],
                   "retention": {"keep_last": 200}},
    }), 201)
    pipelines = expect(call(base, "GET", f"/api/projects/{pid}/pipelines"), 200)["pipelines"]
    pipeline = find(pipelines, "demo") or expect(call(base, "POST", f"/api/projects/{pid}/pipelines", {
        "name": "demo", "source_id": source["id"], "model_id": model["id"], "sink_ids": [sink["id"]],
    }), 201)
    expect(call(base, "POST", "/api/active-pipelines", {"pipeline_id": pipeline["id"]}), 201, 409)

    print(f"""
demo running: open {base}/ in a browser (the web UI: projects, dataset, training, models,
pipelines with live view)
  the demo project          {base}/#/projects/{project['id']}/pipelines
  API and its description   {base}/api/openapi.json
  the demo pipeline         {base}/api/active-pipelines/{pipeline['id']}
  Prometheus metrics        {base}/metrics
  model {model['id']}  threshold {model['threshold']:.2f}  metrics {json.dumps(model['metrics'])}
  results (2 per second)    {results}/results.jsonl and overlay images beside it
Ctrl-C stops the server.""", flush=True)


if __name__ == "__main__":
    main()
