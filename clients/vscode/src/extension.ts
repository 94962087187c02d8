/**
 * The VS Code side: settings, the inline completion provider, the chat commands and a status
 * bar item. The logic lives in `completion.ts`, `chat.ts` and `connection.ts`, which do not
 * import `vscode`.
 */

import * as vscode from "vscode";
import type { PluginUse, Sampling } from "@mlxd/client" with { "resolution-mode": "import" };
import { ChatSession } from "./chat";
import { CompletionEngine, DEFAULT_SETTINGS, type CompletionSettings } from "./completion";
import { ClientManager } from "./connection";

interface Settings {
  endpoint: string;
  model: string;
  maxTokens: number;
  temperature: number;
  sampling: Sampling;
  plugins: PluginUse[];
  completionsEnabled: boolean;
  debounceMs: number;
  chatMaxTokens: number;
  chatSystemPrompt: string;
}

function readSettings(): Settings {
  const c = vscode.workspace.getConfiguration("mlxd");
  const plugins = c.get<unknown>("plugins", []);
  const sampling = c.get<unknown>("sampling", {});
  return {
    endpoint: c.get<string>("endpoint", ""),
    model: c.get<string>("model", ""),
    maxTokens: Math.max(1, Math.floor(c.get<number>("maxTokens", DEFAULT_SETTINGS.maxTokens))),
    temperature: Math.max(0, c.get<number>("temperature", 0)),
    sampling: sampling && typeof sampling === "object" && !Array.isArray(sampling) ? (sampling as Sampling) : {},
    plugins: Array.isArray(plugins) ? (plugins.filter((p) => p && typeof p.name === "string") as PluginUse[]) : [],
    completionsEnabled: c.get<boolean>("inlineCompletions.enabled", true),
    debounceMs: Math.max(0, c.get<number>("inlineCompletions.debounceMs", DEFAULT_SETTINGS.debounceMs)),
    chatMaxTokens: Math.max(1, Math.floor(c.get<number>("chat.maxTokens", 512))),
    chatSystemPrompt: c.get<string>("chat.systemPrompt", ""),
  };
}

let manager: ClientManager | undefined;

export function activate(context: vscode.ExtensionContext): void {
  const log = vscode.window.createOutputChannel("mlxd");
  const chatOut = vscode.window.createOutputChannel("mlxd chat");
  const status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  status.text = "$(hubot) mlxd";
  status.tooltip = "mlxd: not connected yet";
  status.command = "mlxd.chat";
  status.show();
  context.subscriptions.push(log, chatOut, status);

  let lastState = "";
  const clients = new ClientManager(
    () => readSettings(),
    (state, detail) => {
      status.text = state === "connected" ? "$(hubot) mlxd" : "$(debug-disconnect) mlxd";
      status.tooltip = `mlxd: ${state}${detail ? ` — ${detail}` : ""}`;
      if (state !== lastState || state === "connected") log.appendLine(`[${new Date().toISOString()}] ${state}${detail ? `: ${detail}` : ""}`);
      lastState = state;
    },
  );
  manager = clients;

  const engine = new CompletionEngine({
    client: () => clients.get(),
    settings: (): CompletionSettings => {
      const s = readSettings();
      return { ...DEFAULT_SETTINGS, model: s.model, maxTokens: s.maxTokens, temperature: s.temperature, sampling: s.sampling, plugins: s.plugins, debounceMs: s.debounceMs };
    },
    onEvent: (e) => {
      if (e.type === "error") log.appendLine(`completion failed: ${(e.error as Error)?.message ?? e.error}`);
    },
  });

  const provider: vscode.InlineCompletionItemProvider = {
    async provideInlineCompletionItems(document, position, _context, token) {
      if (!readSettings().completionsEnabled) return undefined;
      const offset = document.offsetAt(position);
      const start = document.positionAt(Math.max(0, offset - DEFAULT_SETTINGS.maxPrefixChars));
      const end = document.positionAt(offset + DEFAULT_SETTINGS.maxSuffixChars);
      const prefix = document.getText(new vscode.Range(start, position));
      const suffix = document.getText(new vscode.Range(position, end));
      try {
        const r = await engine.complete({ prefix, suffix }, token, document.uri.toString());
        if (!r) return undefined;
        return [new vscode.InlineCompletionItem(r.text, new vscode.Range(position, position))];
      } catch {
        return undefined; // logged through onEvent; the status bar shows the connection state
      }
    },
  };

  const chat = new ChatSession();

  context.subscriptions.push(
    vscode.languages.registerInlineCompletionItemProvider({ pattern: "**" }, provider),
    vscode.workspace.onDidChangeTextDocument((e) => {
      if (e.contentChanges.length) engine.cancelPending(e.document.uri.toString());
    }),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration("mlxd.endpoint")) {
        engine.cancelPending();
        clients.reset();
        engine.resetModelInfo();
      } else if (e.affectsConfiguration("mlxd.model")) {
        engine.resetModelInfo();
      }
    }),
    vscode.commands.registerCommand("mlxd.chat", async (question?: string) => {
      const q = typeof question === "string" && question ? question : await vscode.window.showInputBox({ prompt: "Ask mlxd", placeHolder: "How do I reverse a list in Python?", ignoreFocusOut: true });
      if (!q) return undefined;
      const s = readSettings();
      if ((s.chatSystemPrompt || undefined) !== chat.system) {
        chat.system = s.chatSystemPrompt || undefined;
        chat.reset();
      }
      chatOut.show(true);
      chatOut.append(`\n> ${q}\n\n`);
      return vscode.window.withProgress(
        { location: vscode.ProgressLocation.Notification, title: "mlxd is answering…", cancellable: true },
        async (_progress, token) => {
          const ac = new AbortController();
          const sub = token.onCancellationRequested(() => ac.abort());
          try {
            const client = await clients.get();
            const a = await chat.ask(client, q, { model: s.model || undefined, maxTokens: s.chatMaxTokens, temperature: s.temperature, sampling: s.sampling, plugins: s.plugins }, (t) => chatOut.append(t), ac.signal);
            const note = a.finishReason === "cancelled" ? " (cancelled)" : a.finishReason === "length" ? " (max tokens reached)" : "";
            chatOut.append(`\n\n[${a.completionTokens} tokens, ${a.tokensPerSecond.toFixed(1)} tok/s${note}]\n`);
            return a;
          } catch (e) {
            const m = (e as Error)?.message ?? String(e);
            chatOut.append(`\n[error] ${m}\n`);
            void vscode.window.showErrorMessage(`mlxd: ${m}`);
            return undefined;
          } finally {
            sub.dispose();
          }
        },
      );
    }),
    vscode.commands.registerCommand("mlxd.newChat", () => {
      chat.reset();
      chatOut.appendLine("\n--- new conversation ---");
    }),
    { dispose: () => clients.dispose() },
  );
}

export function deactivate(): void {
  manager?.dispose();
  manager = undefined;
}
