// Drive the page in Debian's Chromium (headless, through playwright-core; no browser download):
//   node test/drive.mjs JOBS_JSON
// JOBS_JSON: {"executable": "/usr/bin/chromium", "screenshot": "out.png" | null,
//             "jobs": [{"url": page URL with ?export=..., "prompts": ["..."], "timeout_s": 120,
//                       "pick": a folder to pick with the page's folder input instead (optional)}]}
// For each job: open the page, wait for the export to load; for each prompt type it, press
// Generate and wait for "done" (no prompts: the state after loading). Prints a JSON array, per job and prompt, of {state, status,
// model_info, text, ids: {prompt, completion}, console}. The screenshot is of the last page.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";

import { chromium } from "playwright-core";

const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const profile = fs.mkdtempSync(path.join(os.tmpdir(), "gptneo-onnx-chromium-"));
const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];
const context = await chromium.launchPersistentContext(profile, {
  executablePath: spec.executable, headless: true, args: FLAGS, viewport: { width: 1000, height: 900 },
});
const results = [];
try {
  for (const job of spec.jobs) {
    const page = await context.newPage();
    const console_ = [];
    page.on("console", (message) => console_.push(`${message.type()}: ${message.text()}`));
    page.on("pageerror", (error) => console_.push(`pageerror: ${error.message}`));
    const timeout = (job.timeout_s ?? 120) * 1000;
    await page.goto(job.url);
    if (job.pick) await page.locator("#export-folder").setInputFiles(job.pick);
    const state = () => page.locator("#status").getAttribute("data-state");
    await page.waitForFunction(() => ["ready", "error"].includes(document.querySelector("#status").dataset.state), null, { timeout });
    for (const prompt of job.prompts.length ? job.prompts : [null]) {
      if (prompt !== null && (await state()) !== "error") {
        await page.locator("#prompt").fill(prompt);
        await page.locator("#generate").click();
        await page.waitForFunction(() => ["done", "error"].includes(document.querySelector("#status").dataset.state), null, { timeout });
      }
      const ids = await page.locator("#token-ids").textContent();
      results.push({
        state: await state(),
        status: await page.locator("#status").textContent(),
        model_info: await page.locator("#model-info").textContent(),
        text: await page.locator("#completion").textContent(),
        ids: ids ? JSON.parse(ids) : null,
        console: console_,
      });
    }
    if (spec.screenshot && job === spec.jobs.at(-1)) await page.screenshot({ path: spec.screenshot, fullPage: true });
    await page.close();
  }
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
process.stdout.write(`${JSON.stringify(results)}\n`);
