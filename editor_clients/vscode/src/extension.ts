// codefill for VS Code: a thin client for `codefill serve --stdio`.
//
// vscode-languageclient runs the server over stdio and syncs documents; this file adds an inline completion
// provider that forwards textDocument/inlineCompletion (LSP 3.18) with VS Code's cancellation token, a status
// bar item (state and the last suggestion's latency) and three commands. Prompting, debouncing, caching and
// stop rules are the server's. Accepting an item runs its `codefill.accept` command, which the language
// client registered from the server's executeCommandProvider.
import * as vscode from "vscode";
import {
  CancellationToken,
  ClientCapabilities,
  LSPErrorCodes,
  LanguageClient,
  LanguageClientOptions,
  ResponseError,
  ServerOptions,
  State as ClientState,
  StaticFeature,
} from "vscode-languageclient/node";
import { serverCommand, serverKeys, serverSettings } from "./settings";
import { Status, statusText, statusTooltip } from "./status";

interface LspInlineItem {
  insertText: string | { kind: "snippet"; value: string };
  range?: { start: { line: number; character: number }; end: { line: number; character: number } };
  command?: { title: string; command: string; arguments?: unknown[] };
}

let client: LanguageClient | undefined;
let starting: Promise<void> | undefined; // the running client.start(), awaited by requests made meanwhile
let statusItem: vscode.StatusBarItem;
let output: vscode.OutputChannel;
let keys: string[] = [];
const status: Status = { state: "stopped" };

function config(): vscode.WorkspaceConfiguration {
  return vscode.workspace.getConfiguration("codefill");
}

function showStatus(update: Partial<Status>): void {
  Object.assign(status, update);
  if (!config().get<boolean>("enable", true) && status.state === "ready") {
    status.state = "off";
  }
  statusItem.text = statusText(status);
  statusItem.tooltip = statusTooltip(status);
  statusItem.show();
}

/** Declares textDocument.inlineCompletion in the client's capabilities (vscode-languageclient 9 predates it). */
class InlineCompletionCapability implements StaticFeature {
  getState(): { kind: "static" } {
    return { kind: "static" };
  }
  fillClientCapabilities(capabilities: ClientCapabilities): void {
    const textDocument = (capabilities.textDocument ??= {}) as Record<string, unknown>;
    textDocument.inlineCompletion = { dynamicRegistration: false };
  }
  initialize(): void {}
  clear(): void {}
}

const inlineProvider: vscode.InlineCompletionItemProvider = {
  async provideInlineCompletionItems(document, position, context, token) {
    const c = client;
    if (!c || !config().get<boolean>("enable", true)) {
      return undefined;
    }
    if (!c.isRunning() && starting) {
      await starting; // the first keystrokes after opening a file, while the server initializes
    }
    if (!c.isRunning() || token.isCancellationRequested) {
      return undefined;
    }
    const params = {
      textDocument: c.code2ProtocolConverter.asTextDocumentIdentifier(document),
      position: c.code2ProtocolConverter.asPosition(position),
      context: { triggerKind: context.triggerKind === vscode.InlineCompletionTriggerKind.Invoke ? 1 : 2 },
    };
    const started = performance.now();
    let result: { items: LspInlineItem[] } | LspInlineItem[] | null;
    try {
      result = await c.sendRequest("textDocument/inlineCompletion", params, token as CancellationToken);
    } catch (e) {
      // Cancelled by VS Code, or the document changed under the request: the next request is on its way.
      if (e instanceof ResponseError && (e.code === LSPErrorCodes.RequestCancelled || e.code === LSPErrorCodes.ContentModified)) {
        return undefined;
      }
      if (token.isCancellationRequested) {
        return undefined;
      }
      throw e;
    }
    const items = Array.isArray(result) ? result : (result?.items ?? []);
    if (items.length > 0) {
      showStatus({ lastLatencyMs: performance.now() - started });
    }
    return items.map((item) => {
      const text = typeof item.insertText === "string" ? item.insertText : new vscode.SnippetString(item.insertText.value);
      const range = item.range ? c.protocol2CodeConverter.asRange(item.range) : undefined;
      const command = item.command
        ? { title: item.command.title, command: item.command.command, arguments: item.command.arguments }
        : undefined;
      return new vscode.InlineCompletionItem(text, range, command);
    });
  },
};

async function start(): Promise<void> {
  const cfg = config();
  const cmd = serverCommand(
    cfg.get<string>("command", "codefill"),
    cfg.get<string>("model", ""),
    cfg.get<string | null>("server.endpoint", null),
  );
  if ("error" in cmd) {
    showStatus({ state: "error", message: cmd.error });
    void vscode.window.showWarningMessage(`codefill: ${cmd.error}`);
    return;
  }
  const serverOptions: ServerOptions = { command: cmd.command, args: cmd.args };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
    initializationOptions: serverSettings(cfg, keys),
    outputChannel: output,
    middleware: {
      // The completion menu only when asked for: the ghost text is the main view.
      provideCompletionItem: (document, position, context, token, next) =>
        config().get<boolean>("completionMenu", false) ? next(document, position, context, token) : undefined,
    },
  };
  client = new LanguageClient("codefill", "codefill", serverOptions, clientOptions);
  client.registerFeature(new InlineCompletionCapability());
  client.onDidChangeState((e) => {
    if (e.newState === ClientState.Starting) {
      showStatus({ state: "starting", message: undefined });
    } else if (e.newState === ClientState.Running) {
      showStatus({ state: "ready", message: undefined });
    } else {
      showStatus({ state: "stopped" });
    }
  });
  showStatus({ state: "starting" });
  starting = client.start().then(
    () => showStatus({ state: "ready" }),
    (e) => showStatus({ state: "error", message: String(e) }),
  );
  await starting;
  starting = undefined;
}

async function stop(): Promise<void> {
  const c = client;
  client = undefined;
  if (c) {
    await c.dispose();
  }
}

async function showStats(): Promise<void> {
  if (!client?.isRunning()) {
    void vscode.window.showWarningMessage("codefill: the server is not running");
    return;
  }
  const stats = await client.sendRequest<Record<string, unknown>>("codefill/stats", {});
  output.appendLine(JSON.stringify(stats, null, 2));
  output.show(true);
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  keys = serverKeys(context.extension.packageJSON);
  output = vscode.window.createOutputChannel("codefill");
  statusItem = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  statusItem.command = "codefill.toggle";
  context.subscriptions.push(
    output,
    statusItem,
    vscode.languages.registerInlineCompletionItemProvider({ pattern: "**" }, inlineProvider),
    vscode.commands.registerCommand("codefill.restart", async () => {
      await stop();
      await start();
    }),
    vscode.commands.registerCommand("codefill.toggle", async () => {
      const on = !config().get<boolean>("enable", true);
      await config().update("enable", on, vscode.ConfigurationTarget.Global);
    }),
    vscode.commands.registerCommand("codefill.showStats", showStats),
    vscode.workspace.onDidChangeConfiguration(async (e) => {
      if (e.affectsConfiguration("codefill.command") || e.affectsConfiguration("codefill.model")) {
        await stop();
        await start();
      } else if (e.affectsConfiguration("codefill.server") && client?.isRunning()) {
        await client.sendNotification("workspace/didChangeConfiguration", {
          settings: { codefill: serverSettings(config(), keys) },
        });
      }
      if (e.affectsConfiguration("codefill.enable")) {
        showStatus({ state: config().get<boolean>("enable", true) ? (client?.isRunning() ? "ready" : status.state) : "off" });
      }
    }),
  );
  await start();
}

export async function deactivate(): Promise<void> {
  await stop();
}
