#!/usr/bin/env python3
"""Measuring and reporting for benches/e2e_vs_python.sh (standard library only).

  harness.py measure --timeout S --log FILE --json FILE -- CMD...
      Runs CMD (stdout and stderr to FILE), at most S seconds (then SIGTERM, SIGKILL), and writes
      {rc, process_s, peak_rss_mb} to the JSON file: process_s on the monotonic clock, peak RSS
      from wait4 (the process and the children it waited for). Exits with CMD's status.
  harness.py inspectflow --metrics M.json --measure X.json --out DIR [--sink ID] KEY=VALUE...
  harness.py peer --result P.json --measure X.json --out DIR KEY=VALUE...
  harness.py benchmark-app --log FILE KEY=VALUE...
      Each prints one JSON record (the KEY=VALUE pairs are copied into it) for the results file.
  harness.py report RESULTS.jsonl
      The per-round tables and the medians.
"""

import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time


def extra_fields(pairs):
    fields = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            fields[key] = int(value)
        except ValueError:
            fields[key] = value
    return fields


def option(args, name, default=None):
    if name in args:
        i = args.index(name)
        value = args[i + 1]
        del args[i:i + 2]
        return value
    return default


def image_files(folder):
    try:
        return sum(1 for n in os.listdir(folder) if n.endswith((".jpg", ".jpeg")))
    except FileNotFoundError:
        return 0


def measure(args):
    split = args.index("--")
    opts, command = args[:split], args[split + 1:]
    timeout = float(option(opts, "--timeout", "900"))
    log_path = option(opts, "--log")
    json_path = option(opts, "--json")
    started = time.monotonic()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = started + timeout
        timed_out = False
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline and not timed_out:
                timed_out = True
                os.killpg(child.pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
            elif timed_out and time.monotonic() > deadline:
                os.killpg(child.pid, signal.SIGKILL)
                deadline = math.inf
            time.sleep(0.05)
    rc = os.waitstatus_to_exitcode(status)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"rc": rc, "timed_out": timed_out,
                   "process_s": round(time.monotonic() - started, 3),
                   "peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1)}, f)
    if timed_out:
        print(f"harness: {command[0]} ran past {timeout:.0f} s and was stopped", file=sys.stderr)
        return 124
    return rc


def record_inspectflow(args):
    metrics_path = option(args, "--metrics")
    measure_path = option(args, "--measure")
    out = option(args, "--out")
    sink_id = option(args, "--sink", "results")
    with open(metrics_path, encoding="utf-8") as f:
        metrics = json.load(f)
    with open(measure_path, encoding="utf-8") as f:
        measured = json.load(f)
    sink = next(n for n in metrics["nodes"] if n["id"] == sink_id)
    source = next(n for n in metrics["nodes"] if n["kind"] == "source")
    frames = sink["packets_in"]
    seconds = metrics["elapsed_s"]
    record = {
        "tool": "inspectflow",
        "frames": frames,
        "frames_read": source["packets_out"],
        "seconds": round(seconds, 4),
        "fps": round(frames / seconds, 2) if seconds > 0 else None,
        "sink_fps": sink.get("fps"),
        "dropped": sum(e["dropped"] for e in metrics["edges"]),
        "errors": sum(n["errors"] for n in metrics["nodes"]),
        "files": image_files(out),
        "peak_rss_mb": measured["peak_rss_mb"],
        "process_s": measured["process_s"],
        "stage_p50_ms": {n["id"]: n["latency_ms"]["p50"] for n in metrics["nodes"]
                         if n.get("latency_ms")},
    }
    e2e = sink.get("end_to_end_ms")
    if e2e:
        record["latency_ms"] = {"p50": e2e["p50"], "p99": e2e["p99"], "max": e2e["max"]}
    record.update(extra_fields(args))
    print(json.dumps(record))
    return 0


def record_peer(args):
    result_path = option(args, "--result")
    measure_path = option(args, "--measure")
    out = option(args, "--out")
    with open(result_path, encoding="utf-8") as f:
        lines = [line for line in f if line.startswith("{")]
    result = json.loads(lines[-1])
    with open(measure_path, encoding="utf-8") as f:
        measured = json.load(f)
    record = {
        "tool": "python",
        "frames": result["frames"],
        "frames_read": result["frames_read"],
        "seconds": result["seconds"],
        "fps": result["fps"],
        "dropped": result["dropped"],
        "errors": len(result["errors"]),
        "files": image_files(out),
        "peak_rss_mb": measured["peak_rss_mb"],
        "process_s": measured["process_s"],
        "requests": result["requests"],
    }
    if "latency_ms" in result:
        record["latency_ms"] = result["latency_ms"]
    record.update(extra_fields(args))
    print(json.dumps(record))
    return 0


def record_benchmark_app(args):
    logs = []
    while "--log" in args:
        logs.append(option(args, "--log"))
    record = {"tool": "benchmark_app"}
    for path in logs:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        throughput = re.search(r"Throughput:\s+([0-9.]+)\s*FPS", text)
        if throughput and "fps" not in record:
            record["fps"] = float(throughput.group(1))
        # The first latency block is the whole run's ("Median:" or "99 percentile:").
        for label, key in (("Median", "p50"), ("99 percentile", "p99")):
            found = re.search(rf"{label}:\s+([0-9.]+)\s*(ms|us)", text)
            if found:
                value = float(found.group(1)) / (1000.0 if found.group(2) == "us" else 1.0)
                record.setdefault("latency_ms", {})[key] = value
    if "fps" not in record:
        print(f"harness: no Throughput line in {logs}", file=sys.stderr)
        return 1
    record.update(extra_fields(args))
    print(json.dumps(record))
    return 0


def fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a, b):
    return a / b if a and b else None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(args):
    with open(args[0], encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        print("no results")
        return 1
    mode = records[0].get("mode", "throughput")
    rounds = sorted({r["round"] for r in records})
    clips = []
    for r in records:
        if "clip" in r and r["clip"] not in clips:
            clips.append(r["clip"])

    def find(round_, tool, clip=None):
        for r in records:
            if r["round"] == round_ and r["tool"] == tool and (clip is None or r.get("clip") == clip):
                return r
        return None

    warnings = []
    for r in records:
        if r["tool"] in ("inspectflow", "python"):
            if r.get("errors"):
                warnings.append(f"round {r['round']} {r['clip']} {r['tool']}: {r['errors']} errors")
            if r.get("files") != r.get("frames"):
                warnings.append(f"round {r['round']} {r['clip']} {r['tool']}: {r.get('files')} "
                                f"files for {r.get('frames')} frames")
            if mode == "throughput" and r.get("dropped"):
                warnings.append(f"round {r['round']} {r['clip']} {r['tool']}: {r['dropped']} "
                                "frames dropped in a batch run")

    if mode == "throughput":
        head = (f"{'round':>5}  {'clip':<6} {'frames':>6}  {'inspectflow':>11}  {'python':>7}  "
                f"{'bench_app':>9}  {'if/py':>6}  {'if/ba':>6}  {'RSS if MB':>9}  {'RSS py MB':>9}")
        print("FPS (frames / seconds from first frame to last file written; benchmark_app: "
              "inference alone)")
        print(head)
        per_clip = {c: {"if": [], "py": [], "ba": [], "if_py": [], "if_ba": [], "rss_if": [],
                        "rss_py": []} for c in clips}
        for round_ in rounds:
            ba = find(round_, "benchmark_app")
            ba_fps = ba["fps"] if ba else None
            for clip in clips:
                ours, peer = find(round_, "inspectflow", clip), find(round_, "python", clip)
                if_fps = ours["fps"] if ours else None
                py_fps = peer["fps"] if peer else None
                frames = ours["frames"] if ours else (peer["frames"] if peer else None)
                if ours and peer and ours["frames"] != peer["frames"]:
                    frames = f"{ours['frames']}/{peer['frames']}"
                row = per_clip[clip]
                row["if"].append(if_fps)
                row["py"].append(py_fps)
                row["ba"].append(ba_fps)
                row["if_py"].append(ratio(if_fps, py_fps))
                row["if_ba"].append(ratio(if_fps, ba_fps))
                row["rss_if"].append(ours["peak_rss_mb"] if ours else None)
                row["rss_py"].append(peer["peak_rss_mb"] if peer else None)
                print(f"{round_:>5}  {clip:<6} {str(frames):>6}  {fmt(if_fps):>11}  "
                      f"{fmt(py_fps):>7}  {fmt(ba_fps):>9}  "
                      f"{fmt(ratio(if_fps, py_fps), 2) + 'x':>6}  "
                      f"{fmt(ratio(if_fps, ba_fps), 2) + 'x':>6}  "
                      f"{fmt(row['rss_if'][-1], 0):>9}  {fmt(row['rss_py'][-1], 0):>9}")
        print(f"\nmedians over {len(rounds)} round(s) (ratios: median of the per-round ratios)")
        print(head.replace("round", "     ", 1).replace("frames", "      ", 1))
        for clip, row in per_clip.items():
            print(f"{'':>5}  {clip:<6} {'':>6}  {fmt(median(row['if'])):>11}  "
                  f"{fmt(median(row['py'])):>7}  {fmt(median(row['ba'])):>9}  "
                  f"{fmt(median(row['if_py']), 2) + 'x':>6}  "
                  f"{fmt(median(row['if_ba']), 2) + 'x':>6}  "
                  f"{fmt(median(row['rss_if']), 0):>9}  {fmt(median(row['rss_py']), 0):>9}")
    else:
        print("live: clip read at its own frame rate; latency from capture to the file written "
              "(ms); benchmark_app: -hint latency, inference alone")
        head = (f"{'round':>5}  {'clip':<6} {'tool':<13} {'frames':>6} {'dropped':>7}  "
                f"{'fps':>6}  {'p50 ms':>7}  {'p99 ms':>7}  {'RSS MB':>6}")
        print(head)
        summary = {}
        for round_ in rounds:
            for clip in clips:
                for tool in ("inspectflow", "python"):
                    r = find(round_, tool, clip)
                    if not r:
                        continue
                    lat = r.get("latency_ms") or {}
                    key = (clip, tool)
                    summary.setdefault(key, {"p50": [], "p99": [], "fps": [], "dropped": [],
                                             "rss": []})
                    summary[key]["p50"].append(lat.get("p50"))
                    summary[key]["p99"].append(lat.get("p99"))
                    summary[key]["fps"].append(r.get("fps"))
                    summary[key]["dropped"].append(r.get("dropped"))
                    summary[key]["rss"].append(r.get("peak_rss_mb"))
                    print(f"{round_:>5}  {clip:<6} {tool:<13} {r['frames']:>6} "
                          f"{r.get('dropped', 0):>7}  {fmt(r.get('fps')):>6}  "
                          f"{fmt(lat.get('p50'), 2):>7}  {fmt(lat.get('p99'), 2):>7}  "
                          f"{fmt(r.get('peak_rss_mb'), 0):>6}")
            ba = find(round_, "benchmark_app")
            if ba:
                lat = ba.get("latency_ms") or {}
                key = ("model", "benchmark_app")
                summary.setdefault(key, {"p50": [], "p99": [], "fps": [], "dropped": [],
                                         "rss": []})
                summary[key]["p50"].append(lat.get("p50"))
                summary[key]["p99"].append(lat.get("p99"))
                summary[key]["fps"].append(ba.get("fps"))
                print(f"{round_:>5}  {'model':<6} {'benchmark_app':<13} {'':>6} {'':>7}  "
                      f"{fmt(ba.get('fps')):>6}  {fmt(lat.get('p50'), 2):>7}  "
                      f"{fmt(lat.get('p99'), 2):>7}  {'':>6}")
        print(f"\nmedians over {len(rounds)} round(s)")
        print(head.replace("round", "     ", 1))
        for (clip, tool), s in summary.items():
            dropped = median(s["dropped"])
            print(f"{'':>5}  {clip:<6} {tool:<13} {'':>6} "
                  f"{fmt(dropped, 0) if dropped is not None else '':>7}  "
                  f"{fmt(median(s['fps'])):>6}  {fmt(median(s['p50']), 2):>7}  "
                  f"{fmt(median(s['p99']), 2):>7}  {fmt(median(s['rss']), 0):>6}")
    if warnings:
        print("\nwarnings:")
        for w in warnings:
            print(f"  {w}")
    return 0


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    command, args = sys.argv[1], sys.argv[2:]
    handlers = {"measure": measure, "inspectflow": record_inspectflow, "peer": record_peer,
                "benchmark-app": record_benchmark_app, "report": report}
    if command not in handlers:
        print(__doc__)
        return 2
    return handlers[command](args)


if __name__ == "__main__":
    sys.exit(main())
