// A stand-in for the `vscode` module: just the API surface the extension touches, recording
// what it registers so tests can drive it. Installed with `install()` before the extension is
// required; no VS Code download.

const Module = require("node:module");

function createStub() {
  const registered = { commands: new Map(), inlineProviders: [], changeListeners: [], configListeners: [] };
  const outputs = new Map();
  const config = new Map();
  const inputAnswers = [];
  const errors = [];

  class Position {
    constructor(line, character) {
      this.line = line;
      this.character = character;
    }
  }
  class Range {
    constructor(start, end) {
      this.start = start;
      this.end = end;
    }
  }
  class InlineCompletionItem {
    constructor(insertText, range) {
      this.insertText = insertText;
      this.range = range;
    }
  }
  class CancellationTokenSource {
    constructor() {
      const listeners = new Set();
      this.token = {
        isCancellationRequested: false,
        onCancellationRequested(l) {
          listeners.add(l);
          return { dispose: () => listeners.delete(l) };
        },
      };
      this.cancel = () => {
        if (this.token.isCancellationRequested) return;
        this.token.isCancellationRequested = true;
        for (const l of listeners) l();
      };
    }
  }
  const disposable = (f = () => {}) => ({ dispose: f });

  const vscode = {
    Position,
    Range,
    InlineCompletionItem,
    CancellationTokenSource,
    StatusBarAlignment: { Left: 1, Right: 2 },
    ProgressLocation: { SourceControl: 1, Window: 10, Notification: 15 },
    window: {
      createOutputChannel(name) {
        const ch = { name, text: "", shown: false, append: (t) => (ch.text += t), appendLine: (t) => (ch.text += `${t}\n`), show: () => (ch.shown = true), dispose() {} };
        outputs.set(name, ch);
        return ch;
      },
      createStatusBarItem() {
        return { text: "", tooltip: "", command: undefined, show() {}, hide() {}, dispose() {} };
      },
      async showInputBox() {
        return inputAnswers.shift();
      },
      async showErrorMessage(m) {
        errors.push(m);
      },
      async withProgress(_options, task) {
        const source = new CancellationTokenSource();
        vscode.window.lastProgress = source;
        return task({ report() {} }, source.token);
      },
      lastProgress: undefined,
    },
    workspace: {
      getConfiguration(section) {
        return {
          get(key, def) {
            const k = `${section}.${key}`;
            return config.has(k) ? config.get(k) : def;
          },
        };
      },
      onDidChangeTextDocument(l) {
        registered.changeListeners.push(l);
        return disposable();
      },
      onDidChangeConfiguration(l) {
        registered.configListeners.push(l);
        return disposable();
      },
    },
    languages: {
      registerInlineCompletionItemProvider(selector, provider) {
        registered.inlineProviders.push({ selector, provider });
        return disposable();
      },
    },
    commands: {
      registerCommand(name, f) {
        registered.commands.set(name, f);
        return disposable(() => registered.commands.delete(name));
      },
      executeCommand(name, ...args) {
        return registered.commands.get(name)(...args);
      },
    },
  };

  /** A TextDocument over a string. */
  function document(text, uri = "file:///test.py") {
    const lineStarts = [0];
    for (let i = 0; i < text.length; i++) if (text[i] === "\n") lineStarts.push(i + 1);
    const offsetAt = (p) => Math.min(text.length, (lineStarts[p.line] ?? text.length) + p.character);
    const positionAt = (o) => {
      o = Math.max(0, Math.min(text.length, o));
      let line = 0;
      while (line + 1 < lineStarts.length && lineStarts[line + 1] <= o) line++;
      return new Position(line, o - lineStarts[line]);
    };
    return {
      uri: { toString: () => uri },
      getText: (range) => (range ? text.slice(offsetAt(range.start), offsetAt(range.end)) : text),
      offsetAt,
      positionAt,
    };
  }

  /** Simulates the user editing settings. */
  function setConfig(key, value) {
    config.set(key, value);
    const event = { affectsConfiguration: (s) => key === s || key.startsWith(`${s}.`) };
    for (const l of registered.configListeners) l(event);
  }

  return { vscode, registered, outputs, config, setConfig, inputAnswers, errors, document };
}

/** Makes `require("vscode")` return a fresh stub; returns the stub and an uninstall function. */
function install() {
  const stub = createStub();
  const original = Module._load;
  Module._load = function (request, parent, isMain) {
    if (request === "vscode") return stub.vscode;
    return original.call(this, request, parent, isMain);
  };
  return { ...stub, uninstall: () => (Module._load = original) };
}

module.exports = { createStub, install };
