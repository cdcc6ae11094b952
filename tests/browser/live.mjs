// Opens inspectflow's live view page in Debian's headless chromium and reports, as one JSON line
// on stdout, what the page showed: its mode (webrtc or mjpeg), WebRTC frames decoded, a small
// RGB sample of the picture and, when asked, the delay from capture to display.
//
//   node live.mjs BASE_URL PIPELINE_ID [--mode auto|mjpeg] [--view overlay|raw] [--frames 50]
//                 [--timeout-ms 60000]
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
  const page = await browser.newPage();
  const messages = [];
  page.on("console", (message) => messages.push(message.text()));
  await page.goto(`${base}/live?pipeline=${encodeURIComponent(pipeline)}&view=${view}&mode=${mode}`);
  const deadline = Date.now() + timeoutMs;
  let live = {};
  for (;;) {
    live = await page.evaluate(() => ({
      mode: window.live.mode,
      framesDecoded: window.live.framesDecoded,
      error: window.live.error,
      fallbackReason: window.live.fallbackReason,
      imageWidth: document.getElementById("mjpeg").naturalWidth,
      videoWidth: document.getElementById("video").videoWidth,
    }));
    const done =
      (live.mode === "webrtc" && live.framesDecoded >= wantFrames) ||
      (live.mode === "mjpeg" && live.imageWidth > 0);
    if (done || Date.now() > deadline) break;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
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
  await browser.close();
}
console.log(JSON.stringify(result));
