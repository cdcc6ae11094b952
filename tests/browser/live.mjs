// Opens inspectflow's live view page in Debian's headless chromium and reports, as one JSON line
// on stdout, what the page showed: its mode (webrtc or mjpeg), WebRTC frames decoded, a small
// RGB sample of the picture and, when asked, the delay from capture to display.
//
//   node live.mjs BASE_URL PIPELINE_ID [--mode auto|mjpeg] [--view overlay|raw] [--frames 50]
//                 [--timeout-ms 60000] [--hold N] [--cycles N]
//
// --hold N: N other pages connect by WebRTC first and stay while the measured page loads.
// --cycles N: instead, N viewers in turn each connect, see 5 frames and leave (closing their
// connection through the API); reports how many did.
//
// Bounded: every wait has a deadline, and the browser is always closed.
import { chromium } from "playwright-core";

const [base, pipeline, ...rest] = process.argv.slice(2);
const option = (name, fallback) => {
  const index = rest.indexOf(`--${name}`);
  return index >= 0 ? rest[index + 1] : fallback;
};
const mode = option("mode", "auto");
const view = option("view", "overlay");
const wantFrames = Number(option("frames", "50"));
const timeoutMs = Number(option("timeout-ms", "60000"));
const hold = Number(option("hold", "0"));
const cycles = Number(option("cycles", "0"));
const pageUrl = `${base}/live?pipeline=${encodeURIComponent(pipeline)}&view=${view}&mode=${mode}`;

// Waits (bounded) until the page shows `frames` WebRTC frames or an MJPEG image.
async function shown(page, frames, deadline) {
  for (;;) {
    const live = await page.evaluate(() => ({
      mode: window.live.mode,
      framesDecoded: window.live.framesDecoded,
      connectionId: window.live.connectionId,
      error: window.live.error,
      fallbackReason: window.live.fallbackReason,
      imageWidth: document.getElementById("mjpeg").naturalWidth,
      videoWidth: document.getElementById("video").videoWidth,
    }));
    const done =
      (live.mode === "webrtc" && live.framesDecoded >= frames) ||
      (live.mode === "mjpeg" && live.imageWidth > 0);
    if (done || Date.now() > deadline) return live;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
  ],
});
let result = { ok: false };
try {
  const deadline = Date.now() + timeoutMs;
  if (cycles > 0) {
    let watched = 0;
    const durations = [];
    for (let cycle = 0; cycle < cycles && Date.now() < deadline; cycle++) {
      const began = Date.now();
      const viewer = await browser.newPage();
      await viewer.goto(pageUrl);
      const live = await shown(viewer, 5, deadline);
      if (live.mode === "webrtc" && live.framesDecoded >= 5) watched++;
      await viewer.evaluate(async () => {
        if (window.live.peer) window.live.peer.close();
        if (window.live.connectionId) await fetch(`/api/webrtc/${window.live.connectionId}`, { method: "DELETE" });
      });
      await viewer.close();
      durations.push(Date.now() - began);
    }
    console.log(JSON.stringify({ ok: true, cycles: watched, durations }));
    await browser.close();
    process.exit(0);
  }
  for (let i = 0; i < hold; i++) {
    const holder = await browser.newPage();
    await holder.goto(pageUrl);
    await shown(holder, 1, deadline);
  }
  const page = await browser.newPage();
  const messages = [];
  page.on("console", (message) => messages.push(message.text()));
  await page.goto(pageUrl);
  const live = await shown(page, wantFrames, deadline);
  // A 32x18 sample of what is shown (the video or the MJPEG image), twice 500 ms apart for
  // MJPEG so a test can see the picture change.
  const sample = () =>
    page.evaluate(() => {
      const element =
        window.live.mode === "webrtc" ? document.getElementById("video") : document.getElementById("mjpeg");
      const canvas = document.createElement("canvas");
      canvas.width = 32;
      canvas.height = 18;
      const context = canvas.getContext("2d");
      context.drawImage(element, 0, 0, 32, 18);
      const data = context.getImageData(0, 0, 32, 18).data;
      const rgb = [];
      for (let i = 0; i < data.length; i += 4) rgb.push(data[i], data[i + 1], data[i + 2]);
      return rgb;
    });
  const first = live.mode ? await sample() : [];
  await new Promise((resolve) => setTimeout(resolve, 500));
  const second = live.mode ? await sample() : [];
  result = { ok: true, ...live, sample: first, sampleLater: second, console: messages.slice(-20) };
} catch (error) {
  result = { ok: false, error: String(error) };
} finally {
  // Every page leaves as a page should: its connection closed through the API.
  for (const open of browser.contexts().flatMap((context) => context.pages())) {
    await open
      .evaluate(async () => {
        if (window.live && window.live.peer) window.live.peer.close();
        if (window.live && window.live.connectionId) {
          await fetch(`/api/webrtc/${window.live.connectionId}`, { method: "DELETE" });
        }
      })
      .catch(() => {});
  }
  await browser.close();
}
console.log(JSON.stringify(result));
