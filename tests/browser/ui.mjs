// Walks a newcomer's whole flow through inspectflow's web UI alone, in Debian's headless
// chromium, and reports one JSON line on stdout: create a project (from the keyboard), upload
// 20 images, train to completed, move the threshold (keyboard) and save it, add a video source
// and a folder sink, build a pipeline from them, start it, watch live frames and metrics,
// capture a frame into the dataset, stop it. Each screen is checked with axe-core (serious and
// critical violations are reported) and saved as a screenshot.
//
//   node ui.mjs BASE_URL --images DIR --video FILE --out DIR --screenshots DIR [--timeout-ms N]
//
// Bounded: every wait has a deadline, and the browser is always closed.
import { readFileSync, readdirSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [base, ...rest] = process.argv.slice(2);
const option = (name, fallback) => {
  const index = rest.indexOf(`--${name}`);
  return index >= 0 ? rest[index + 1] : fallback;
};
const imagesDir = option("images");
const video = option("video");
const outDir = option("out");
const screenshots = option("screenshots");
const timeoutMs = Number(option("timeout-ms", "240000"));
const axeSource = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");

const report = { ok: false, steps: [], accessibility: {} };
const step = (name) => {
  report.steps.push(name);
  process.stderr.write(`ui.mjs: ${name}\n`);
};

/** axe-core's serious and critical violations on the page as it is now. */
async function audit(page, screen) {
  await page.addScriptTag({ content: axeSource });
  const violations = await page.evaluate(async () => {
    const result = await window.axe.run(document, { resultTypes: ["violations"] });
    return result.violations
      .filter((v) => v.impact === "serious" || v.impact === "critical")
      .map((v) => ({ id: v.id, impact: v.impact, help: v.help, targets: v.nodes.map((n) => n.target.join(" ")) }));
  });
  report.accessibility[screen] = violations;
  await page.screenshot({ path: join(screenshots, `ui-${screen}.png`), fullPage: true });
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  page.on("dialog", (dialog) => void dialog.accept());
  const deadline = Date.now() + timeoutMs;
  const left = () => Math.max(1000, deadline - Date.now());

  // Projects: create one from the keyboard alone.
  await page.goto(`${base}/#/projects`);
  await page.getByRole("heading", { name: "Projects" }).waitFor();
  await audit(page, "projects");
  await page.getByLabel("Name", { exact: true }).focus();
  await page.keyboard.type("bottle caps");
  await page.keyboard.press("Enter");
  await page.waitForURL(/#\/projects\/[^/]+\/dataset/);
  report.projectId = decodeURIComponent(page.url().split("#/projects/")[1].split("/")[0]);
  step("created a project from the keyboard");

  // Dataset: upload 20 normal images.
  const images = readdirSync(imagesDir).filter((f) => /\.(png|jpe?g)$/i.test(f)).sort().map((f) => join(imagesDir, f));
  await page.getByLabel("Choose images").setInputFiles(images);
  await page.getByText(`${images.length} normal and 0 anomalous images.`).waitFor({ timeout: left() });
  await page.locator(".grid img").first().waitFor();
  await audit(page, "dataset");
  step(`uploaded ${images.length} images`);

  // Snapshot the dataset, then train on that snapshot.
  await page.getByRole("button", { name: "Take snapshot" }).click();
  await page.getByText(`Snapshot of ${images.length} images taken`).waitFor({ timeout: left() });
  await page.getByRole("button", { name: /^Download the snapshot of/ }).first().waitFor();
  step("took a snapshot");

  // Training: PaDiM at 64x64 (quick) on the snapshot, followed to completed.
  await page.getByRole("link", { name: "Training" }).click();
  const dataset = page.getByLabel("Dataset");
  await dataset.locator("option", { hasText: "snapshot of" }).first().waitFor({ state: "attached" });
  await dataset.selectOption({ index: 1 });
  await page.getByLabel("Model family").selectOption("padim");
  await page.getByLabel("input size").fill("64");
  await page.getByRole("button", { name: "Start training" }).click();
  await page.locator("#job-status", { hasText: /completed|failed|canceled/ }).waitFor({ timeout: left() });
  report.training = await page.locator("#job-status").textContent();
  if (report.training !== "completed") throw new Error(`training ended ${report.training}`);
  await audit(page, "training");
  step("trained to completed");

  // Models: the slider previews the flagged images; move it from the keyboard and save.
  await page.getByRole("link", { name: "Models" }).click();
  const slider = page.getByRole("slider").first();
  await slider.waitFor();
  await page.locator(".thresholds figure").nth(11).waitFor({ timeout: left() });
  report.thresholdBefore = Number(await slider.inputValue());
  await slider.focus();
  for (let i = 0; i < 20; i++) await page.keyboard.press("ArrowLeft");
  report.thresholdAfter = Number(await slider.inputValue());
  report.thresholdPreview = await page.locator("output").first().textContent();
  await page.getByRole("button", { name: "Save threshold" }).focus();
  await page.keyboard.press("Enter");
  await page.getByText(/Threshold .* saved\./).waitFor();
  await audit(page, "models");
  step(`moved the threshold ${report.thresholdBefore} -> ${report.thresholdAfter}`);

  // Devices and sources: a looping video source and a folder sink.
  await page.getByRole("link", { name: "Devices and sources" }).click();
  const sources = page.getByRole("form", { name: "New source" });
  await sources.getByLabel("source name").fill("line camera");
  await sources.getByLabel("source type").selectOption("video_file");
  await sources.getByLabel("source path").fill(video);
  await sources.getByLabel("More settings (JSON)").fill('{"realtime": true, "loop": true}');
  await sources.getByRole("button", { name: "Save source" }).click();
  await page.getByText("source “line camera” saved.").waitFor();
  const sinks = page.getByRole("form", { name: "New sink" });
  await sinks.getByLabel("sink name").fill("results folder");
  await sinks.getByLabel("sink type").selectOption("folder");
  await sinks.getByLabel("sink path").fill(outDir);
  await sinks.getByLabel("More settings (JSON)").fill('{"create": true}');
  await sinks.getByRole("button", { name: "Save sink" }).click();
  await page.getByText("sink “results folder” saved.").waitFor();
  await audit(page, "devices");
  step("added a source and a sink");

  // Pipelines: build, start, watch live, read the metrics.
  await page.goto(`${base}/#/projects/${report.projectId}/pipelines`);
  await page.getByLabel("Pipeline name").fill("line 1");
  await page.getByLabel("results folder (folder)").check();
  await page.getByLabel("When a queue is full").selectOption("block");
  await page.getByRole("button", { name: "Save pipeline" }).click();
  await page.getByText("Pipeline “line 1” saved.").waitFor();
  await page.getByRole("button", { name: "Start", exact: true }).click();
  await page.getByTestId("pipeline-status").filter({ hasText: "inspecting" }).waitFor();
  await page.getByRole("button", { name: "Watch live" }).click();
  const live = page.frameLocator('iframe[title="Live view"]');
  await live.locator("body").waitFor();
  const frame = page.frames().find((f) => f.url().includes("/live?"));
  for (;;) {
    const shown = await frame.evaluate(() => ({
      mode: window.live?.mode,
      frames: window.live?.framesDecoded ?? 0,
      image: document.getElementById("mjpeg")?.naturalWidth ?? 0,
    }));
    if (shown.frames >= 10 || shown.image > 0) {
      report.live = shown;
      break;
    }
    if (Date.now() > deadline) throw new Error(`no live frame: ${JSON.stringify(shown)}`);
    await page.waitForTimeout(200);
  }
  await page.getByTestId("fps").filter({ hasText: /^[1-9][0-9.]* FPS/ }).waitFor({ timeout: left() });
  report.fps = await page.getByTestId("fps").textContent();
  const metrics = page.getByRole("table", { name: "Node metrics" });
  report.metricsRows = await metrics.locator("tbody tr").count();
  // The source's row says whether its camera delivers (the column after Errors).
  const sourceRow = metrics.locator("tbody tr", { has: page.locator("td", { hasText: /^source\./ }) });
  report.sourceState = await sourceRow.first().locator("td").nth(8).textContent();
  await audit(page, "pipelines");
  step(`watched live (${JSON.stringify(report.live)}) at ${report.fps}`);

  // Dataset: capture the running camera's frame.
  await page.getByRole("link", { name: "Dataset" }).click();
  await page.getByRole("button", { name: "Capture frame" }).click();
  await page.getByText(/^Captured .* as normal\.$/).waitFor();
  await page.getByText(`${images.length + 1} normal and 0 anomalous images.`).waitFor();
  step("captured a frame into the dataset");

  // Pipelines: stop.
  await page.getByRole("link", { name: "Pipelines" }).click();
  await page.getByRole("button", { name: "Stop" }).click();
  await page.getByTestId("pipeline-status").filter({ hasText: "stopped" }).waitFor();
  step("stopped the pipeline");
  report.ok = true;
} catch (error) {
  report.error = String(error?.stack ?? error);
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
