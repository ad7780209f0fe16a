// The extension's settings, read without the vscode module so that unit tests can run them under node.
//
// `codefill.server.<key>` mirrors the server's settings table (lsp/settings.py) key by key; they travel
// unchanged as initializationOptions and workspace/didChangeConfiguration, nested under "codefill". The
// server validates them and answers a bad value with a message naming it.

export const SERVER_PREFIX = "server.";

/** What `vscode.workspace.getConfiguration("codefill")` gives: `get` and the list of keys. */
export interface ConfigSource {
  get<T>(key: string): T | undefined;
}

/** The server settings: every `codefill.server.<key>` from `keys` (package.json's list), by its bare key. */
export function serverSettings(config: ConfigSource, keys: readonly string[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const key of keys) {
    const value = config.get(SERVER_PREFIX + key);
    if (value !== undefined) {
      out[key] = value;
    }
  }
  return out;
}

/** The bare server keys declared in package.json's `contributes.configuration.properties`. */
export function serverKeys(packageJson: { contributes: { configuration: { properties: object } } }): string[] {
  const prefix = "codefill." + SERVER_PREFIX;
  return Object.keys(packageJson.contributes.configuration.properties)
    .filter((name) => name.startsWith(prefix))
    .map((name) => name.slice(prefix.length));
}

/** `codefill serve --stdio --model M [--endpoint E]`: the command line, or an error message. */
export function serverCommand(
  command: string,
  model: string,
  endpoint: string | null | undefined,
): { command: string; args: string[] } | { error: string } {
  if (!command) {
    return { error: "codefill.command is empty: set it to the codefill executable" };
  }
  // An empty model: the server's own default, the bundled model (models/codefill-pypi-5m).
  const args = model ? ["serve", "--stdio", "--model", model] : ["serve", "--stdio"];
  if (endpoint) {
    args.push("--endpoint", endpoint);
  }
  return { command, args };
}
