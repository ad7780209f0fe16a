// Unit tests of the parts that do not need VS Code: settings pass-through, the server command, the status bar.
import { test } from "node:test";
import * as assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { serverCommand, serverKeys, serverSettings } from "../src/settings";
import { statusText, statusTooltip } from "../src/status";

const pkg = JSON.parse(readFileSync(join(__dirname, "..", "..", "package.json"), "utf8"));

function source(values: Record<string, unknown>) {
  return { get: <T>(key: string) => values[key] as T | undefined };
}

test("every codefill.server.* setting is passed through under its bare key", () => {
  const keys = serverKeys(pkg);
  assert.ok(keys.includes("max_new_tokens") && keys.includes("languages") && keys.includes("endpoint"));
  assert.ok(!keys.includes("model") && !keys.includes("command"));
  const settings = serverSettings(source({ "server.max_new_tokens": 32, "server.languages": ["python"] }), keys);
  assert.deepEqual(settings, { max_new_tokens: 32, languages: ["python"] });
});

test("package.json defaults are the server's, as JSON", () => {
  const props = pkg.contributes.configuration.properties;
  assert.equal(props["codefill.server.max_new_tokens"].default, 64);
  assert.equal(props["codefill.server.fim_order"].default, "spm");
  assert.equal(props["codefill.server.endpoint"].default, null);
});

test("the server command line", () => {
  assert.deepEqual(serverCommand("codefill", "/m", null), {
    command: "codefill",
    args: ["serve", "--stdio", "--model", "/m"],
  });
  assert.deepEqual(serverCommand("/v/codefill", "/m", "ipc:///tmp/w"), {
    command: "/v/codefill",
    args: ["serve", "--stdio", "--model", "/m", "--endpoint", "ipc:///tmp/w"],
  });
  assert.deepEqual(serverCommand("codefill", "", null), { command: "codefill", args: ["serve", "--stdio"] });
});

test("status bar text shows the state and the last latency", () => {
  assert.equal(statusText({ state: "ready", lastLatencyMs: 41.6 }), "$(sparkle) codefill 42 ms");
  assert.equal(statusText({ state: "ready" }), "$(sparkle) codefill");
  assert.equal(statusText({ state: "off", lastLatencyMs: 10 }), "$(circle-slash) codefill off");
  assert.equal(statusText({ state: "starting" }), "$(loading~spin) codefill starting");
  assert.match(statusTooltip({ state: "error", message: "boom" }), /codefill: error\nboom/);
});
