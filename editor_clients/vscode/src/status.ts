// The status bar item's text and tooltip, as pure functions of the client's state (unit-tested under node).

export type State = "starting" | "ready" | "off" | "error" | "stopped";

export interface Status {
  state: State;
  lastLatencyMs?: number; // the last inline-completion round trip that returned a suggestion
  message?: string; // the error, for state "error"
}

const ICONS: Record<State, string> = {
  starting: "$(loading~spin)",
  ready: "$(sparkle)",
  off: "$(circle-slash)",
  error: "$(error)",
  stopped: "$(debug-stop)",
};

export function statusText(s: Status): string {
  if (s.state !== "ready") {
    return `${ICONS[s.state]} codefill ${s.state}`;
  }
  const latency = s.lastLatencyMs !== undefined ? ` ${Math.round(s.lastLatencyMs)} ms` : "";
  return `${ICONS[s.state]} codefill${latency}`;
}

export function statusTooltip(s: Status): string {
  const lines = [`codefill: ${s.state}`];
  if (s.lastLatencyMs !== undefined) {
    lines.push(`last suggestion: ${Math.round(s.lastLatencyMs)} ms`);
  }
  if (s.message) {
    lines.push(s.message);
  }
  lines.push("click: toggle suggestions");
  return lines.join("\n");
}
