// The live view's cost and delay, measured through the API and Debian's headless chromium
// (benches/live_view.sh starts the server and trains the model; see there for the settings).
//
//   node bench.mjs BASE_URL MODEL_DIR [--rounds 3] [--seconds 10] [--width 640 --height 360]
//
// 1. Throughput: a pipeline on source.synthetic as fast as it goes (every frame inspected), with
//    0, 1 and 4 WebRTC viewers of the overlay, in an order that rotates each round; FPS is what
//    reached the sink over the window, each round's ratio is against its own 0-viewer window.
// 2. Delay: the same pipeline paced at 30 FPS like a camera, the capture time drawn into each
//    frame (source.synthetic `timestamp: true`); one page per mode (WebRTC, MJPEG) and view
//    (overlay, raw) reads the time back from every frame it shows and takes it from the clock
//    (one machine, one clock): the delay from capture to the picture in the browser. The
//    pipeline's own capture-to-sink latency comes from its metrics for comparison.
// Results: one JSON line per measurement, then a Markdown summary.
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, "../../tests/browser/package.json"));
const { chromium } = require("playwright-core");

const [base, modelDir, ...rest] = process.argv.slice(2);
const option = (name, fallback) => {
  const index = rest.indexOf(`--${name}`);
  return index >= 0 ? Number(rest[index + 1]) : fallback;
};
const rounds = option("rounds", 3);
const seconds = option("seconds", 10);
const width = option("width", 640);
const height = option("height", 360);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function api(method, route, body) {
  const response = await fetch(`${base}${route}`, {
    method,
    headers: body ? { "content-type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${route}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

function graph(name, realtime) {
  const preview = { capacity: 1, policy: "drop_oldest" };
  return {
    name,
    nodes: [
      {
        id: "camera",
        op: "source.synthetic",
        params: { width, height, fps: 30, realtime, timestamp: true, pattern: "gradient" },
      },
      { id: "preprocess", op: "preprocess", params: { width: 256, height: 256 } },
      { id: "model", op: "infer.openvino", params: { model: `${modelDir}/model.xml`, device: "CPU" } },
      { id: "verdict", op: "anomaly", params: { model: modelDir } },
      { id: "heatmap", op: "heatmap", params: { outline: false, label: false } },
      { id: "jpeg", op: "encode.jpeg", params: {} },
      { id: "results", op: "sink.null", params: {} },
      { id: "preview", op: "sink.preview", params: { view: "overlay" } },
      { id: "preview_raw", op: "sink.preview", params: { view: "raw" } },
    ],
    edges: [
      { from: "camera", to: "preprocess" },
      { from: "preprocess", to: "model" },
      { from: "model", to: "verdict" },
      { from: "verdict", to: "heatmap" },
      { from: "heatmap", to: "jpeg" },
      { from: "jpeg", to: "results" },
      { from: "jpeg", to: "preview", queue: preview },
      { from: "camera", to: "preview_raw", queue: preview },
    ],
  };
}

const node = (metrics, id) => metrics.nodes.find((n) => n.id === id);

async function start(project, name, realtime) {
  const pipeline = await api("POST", `/api/projects/${project}/pipelines`, { name, graph: graph(name, realtime) });
  await api("POST", "/api/active-pipelines", { pipeline_id: pipeline.id });
  return pipeline.id;
}

async function sinkCount(pipeline) {
  const status = await api("GET", `/api/active-pipelines/${pipeline}`);
  return node(status.metrics, "results").packets_in;
}

// Opens `count` pages watching `pipeline`, each waiting (bounded) for 5 frames.
async function openViewers(browser, pipeline, count, mode = "auto", view = "overlay") {
  const pages = [];
  for (let i = 0; i < count; i++) {
    const page = await browser.newPage();
    await page.goto(`${base}/live?pipeline=${pipeline}&view=${view}&mode=${mode}`);
    const deadline = Date.now() + 30000;
    for (;;) {
      const live = await page.evaluate(() => ({
        mode: window.live.mode,
        frames: window.live.framesDecoded,
        image: document.getElementById("mjpeg").naturalWidth,
      }));
      if ((live.mode === "webrtc" && live.frames >= 5) || (live.mode === "mjpeg" && live.image > 0)) break;
      if (Date.now() > deadline) throw new Error(`viewer ${i + 1} of ${count} shows nothing: ${JSON.stringify(live)}`);
      await sleep(200);
    }
    pages.push(page);
  }
  return pages;
}

async function closeViewers(pages) {
  for (const page of pages) {
    await page
      .evaluate(async () => {
        if (window.live.peer) window.live.peer.close();
        if (window.live.connectionId) await fetch(`/api/webrtc/${window.live.connectionId}`, { method: "DELETE" });
      })
      .catch(() => {});
    await page.close();
  }
}

// Reads the capture time drawn into each shown frame for `ms` and returns the delays.
async function delays(page, ms) {
  return page.evaluate(
    async ({ ms, bits }) => {
      const element =
        window.live.mode === "webrtc" ? document.getElementById("video") : document.getElementById("mjpeg");
      const sourceWidth = element.videoWidth || element.naturalWidth;
      const block = Math.max(2, Math.floor(sourceWidth / (2 * bits)));
      const canvas = document.createElement("canvas");
      canvas.width = 2 * bits * block;
      canvas.height = block;
      const context = canvas.getContext("2d", { willReadFrequently: true });
      const read = () => {
        context.drawImage(element, 0, 0, canvas.width, block, 0, 0, canvas.width, block);
        const row = context.getImageData(0, Math.floor(block / 2), canvas.width, 1).data;
        const luma = (x) => row[4 * x] * 0.3 + row[4 * x + 1] * 0.59 + row[4 * x + 2] * 0.11;
        let value = 0;
        for (let bit = 0; bit < bits; bit++) {
          const centre = (half) => luma((2 * bit + half) * block + Math.floor(block / 2));
          value = value * 2 + (centre(0) > centre(1) ? 1 : 0);
        }
        return value;
      };
      const modulo = 2 ** bits;
      const seen = [];
      let last = -1;
      const until = Date.now() + ms;
      await new Promise((resolve) => {
        const onFrame = () => {
          const captured = read();
          const now = Date.now();
          if (captured !== last) {
            last = captured;
            const delay = (((now % modulo) - captured) % modulo + modulo) % modulo;
            if (delay < 10000) seen.push(delay);
          }
          if (now > until) resolve();
          else if (element.requestVideoFrameCallback) element.requestVideoFrameCallback(onFrame);
          else requestAnimationFrame(onFrame);
        };
        if (element.requestVideoFrameCallback) element.requestVideoFrameCallback(onFrame);
        else requestAnimationFrame(onFrame);
      });
      return seen;
    },
    { ms, bits: 40 },
  );
}

const percentile = (values, p) => {
  if (values.length === 0) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
};
const median = (values) => percentile(values, 50);
const emit = (record) => console.log(JSON.stringify(record));

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
});
const summary = { throughput: [], delay: [] };
try {
  const project = (await api("POST", "/api/projects", { name: "live-view-bench" })).id;

  // 1. Throughput with 0, 1 and 4 viewers.
  const fast = await start(project, "throughput", false);
  await sleep(3000);
  const counts = [0, 1, 4];
  const fps = { 0: [], 1: [], 4: [] };
  const ratios = { 1: [], 4: [] };
  for (let round = 0; round < rounds; round++) {
    const order = counts.map((_, i) => counts[(i + round) % counts.length]);
    const measured = {};
    for (const viewers of order) {
      const pages = await openViewers(browser, fast, viewers);
      const before = await sinkCount(fast);
      const began = Date.now();
      await sleep(seconds * 1000);
      const after = await sinkCount(fast);
      measured[viewers] = (after - before) / ((Date.now() - began) / 1000);
      await closeViewers(pages);
      await sleep(1000);
    }
    for (const viewers of counts) fps[viewers].push(measured[viewers]);
    for (const viewers of [1, 4]) ratios[viewers].push(measured[viewers] / measured[0]);
    emit({ phase: "throughput", round: round + 1, fps: measured });
  }
  await api("DELETE", `/api/active-pipelines/${fast}`);
  for (const viewers of counts) {
    summary.throughput.push({
      viewers,
      fps: median(fps[viewers]),
      ratio: viewers === 0 ? 1 : median(ratios[viewers]),
    });
  }

  // 2. Delay from capture to the browser, camera-paced.
  const paced = await start(project, "camera", true);
  await sleep(3000);
  for (const [mode, view] of [
    ["auto", "overlay"],
    ["auto", "raw"],
    ["mjpeg", "overlay"],
  ]) {
    const all = [];
    for (let round = 0; round < rounds; round++) {
      const [page] = await openViewers(browser, paced, 1, mode, view);
      const shownMode = await page.evaluate(() => window.live.mode);
      const seen = await delays(page, seconds * 1000);
      all.push(...seen);
      await closeViewers([page]);
      emit({ phase: "delay", round: round + 1, mode: shownMode, view, frames: seen.length, p50: median(seen), p99: percentile(seen, 99) });
    }
    summary.delay.push({ mode: mode === "auto" ? "webrtc" : mode, view, frames: all.length, p50: median(all), p95: percentile(all, 95), p99: percentile(all, 99) });
  }
  const status = await api("GET", `/api/active-pipelines/${paced}`);
  summary.pipeline = node(status.metrics, "results").end_to_end_ms;
  await api("DELETE", `/api/active-pipelines/${paced}`);
} finally {
  await browser.close();
}

console.log("\n| viewers (WebRTC, overlay) | pipeline FPS (median) | ratio to 0 viewers (median of rounds) |");
console.log("|---|---|---|");
for (const row of summary.throughput) {
  console.log(`| ${row.viewers} | ${row.fps.toFixed(1)} | ${row.ratio.toFixed(2)} |`);
}
console.log("\n| shown by | view | frames read | delay p50 ms | p95 ms | p99 ms |");
console.log("|---|---|---|---|---|---|");
for (const row of summary.delay) {
  console.log(`| ${row.mode} | ${row.view} | ${row.frames} | ${row.p50} | ${row.p95} | ${row.p99} |`);
}
if (summary.pipeline) {
  const p = summary.pipeline;
  console.log(`\npipeline capture-to-sink (camera-paced run): p50 ${p.p50.toFixed(1)} ms, p99 ${p.p99.toFixed(1)} ms over ${p.count} frames`);
}
