// Drives VS Code (code-server in headless Chromium) as a user would, for tests/test_editor_vscode.py:
// open FILE with Quick Open, put the cursor at its end, type TYPED, wait for the ghost text, screenshot it,
// accept it with Tab (the test's settings auto-save the file). Prints one JSON line: {ghost, status, text}.
//
//   NODE_PATH=editor_clients/.deps/code-server/node_modules node drive.js URL FILE_NAME TYPED EXPECT PNG
// puppeteer-core comes from scripts/setup_editors.sh; the browser is Debian's chromium.
"use strict";
const puppeteer = require("puppeteer-core");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");

const [url, fileName, typed, expect, png] = process.argv.slice(2);
let page;
let failShot; // where a failure leaves a screenshot, once the file is open

function log(msg) {
  process.stderr.write(`[drive ${new Date().toISOString().slice(11, 23)}] ${msg}\n`);
}

async function main() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "codefill-chromium-"));
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      `--user-data-dir=${profile}`,
      "--window-size=1000,420",
    ],
    defaultViewport: { width: 1000, height: 420 },
  });
  try {
    page = await browser.newPage();
    page.setDefaultTimeout(120000);
    await page.goto(url, { waitUntil: "domcontentloaded" });
    await page.waitForSelector(".monaco-workbench .part.editor");
    log("workbench loaded");
    // The extension's status bar item: "codefill" alone once the language client is up.
    await page.waitForFunction(() =>
      [...document.querySelectorAll(".statusbar-item")].some((e) => /^\s*codefill\s*$/.test(e.textContent)),
    );
    log("codefill ready");

    await page.keyboard.down("Control");
    await page.keyboard.press("KeyP");
    await page.keyboard.up("Control");
    await page.waitForSelector(".quick-input-widget input");
    await page.keyboard.type(fileName);
    await page.waitForFunction(
      (name) => [...document.querySelectorAll(".quick-input-list .monaco-list-row")].some((r) => r.textContent.includes(name)),
      {},
      fileName,
    );
    await page.keyboard.press("Enter");
    await page.waitForFunction(
      (name) => [...document.querySelectorAll(".tab")].some((t) => t.textContent.includes(name)),
      {},
      fileName,
    );
    await page.waitForSelector(".monaco-editor .view-lines");
    log("file open");
    await page.click(".monaco-editor .view-lines");
    await page.keyboard.down("Control");
    await page.keyboard.press("End");
    await page.keyboard.up("Control");
    await page.keyboard.type(typed, { delay: 30 });
    log("typed");

    failShot = png && png.replace(/\.png$/, "-failed.png");
    const ghostHandle = await page.waitForFunction(
      (want) => {
        // Ghost text is split into spans by syntax colouring: join them.
        const parts = [...document.querySelectorAll(".monaco-editor .ghost-text-decoration, .monaco-editor .ghost-text")];
        const text = parts.map((e) => e.textContent).join("").replace(/\u00a0/g, " ");
        return text.includes(want) ? text : false;
      },
      { polling: 100, timeout: 60000 },
      expect,
    );
    const ghost = await ghostHandle.jsonValue();
    log(`ghost text: ${JSON.stringify(ghost)}`);
    await new Promise((r) => setTimeout(r, 300));
    const status = await page.evaluate(() =>
      [...document.querySelectorAll(".statusbar-item")].map((e) => e.textContent).find((t) => /codefill/.test(t)),
    );
    if (png) {
      await page.screenshot({ path: png });
    }

    await page.keyboard.press("Tab");
    await page.waitForFunction(
      () => document.querySelectorAll(".monaco-editor .ghost-text-decoration, .monaco-editor .ghost-text").length === 0,
    );
    // The browser side writes the file (auto-save after 200 ms): keep it open until the tab is clean.
    await new Promise((r) => setTimeout(r, 600));
    await page.waitForFunction(() => !document.querySelector(".tab.dirty"));
    await new Promise((r) => setTimeout(r, 500));
    const text = await page.evaluate(() =>
      [...document.querySelectorAll(".monaco-editor .view-line")]
        .sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top))
        .map((e) => {
          // without the next suggestion's ghost text, which may already be on screen
          const line = e.cloneNode(true);
          line.querySelectorAll("[class*=ghost-text]").forEach((g) => g.remove());
          return line.textContent.replace(/\u00a0/g, " ");
        })
        .join("\n"),
    );
    process.stdout.write(JSON.stringify({ ghost, status, text }) + "\n");
  } catch (e) {
    if (failShot) {
      await page.screenshot({ path: failShot });
    }
    throw e;
  } finally {
    await browser.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((e) => {
  process.stderr.write(`drive failed: ${e.stack || e}\n`);
  process.exit(1);
});
