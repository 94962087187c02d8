/**
 * Inline completion logic, free of the `vscode` module so that it runs (and is tested) in plain
 * Node against a live daemon. `extension.ts` adapts VS Code's documents and cancellation tokens
 * to the small interfaces below.
 *
 * - Fill-in-the-middle where the model's tokenizer has FIM tokens (each marker must tokenize to
 *   a single id), prefix-only otherwise.
 * - Debounced: a request waits `debounceMs` before it reaches the daemon, so a burst of
 *   keystrokes costs one generation.
 * - Stale requests are cancelled through an `AbortSignal` (the client sends `cancel` and the
 *   daemon stops within one decode step) when a newer request starts, when the document changes
 *   and when VS Code cancels the request.
 */

import type { GenerateEvent, GenerateRequest, PluginUse, Sampling, TokenizeResult } from "@mlxd/client" with { "resolution-mode": "import" };

/** The part of `@mlxd/client`'s `Client` the engine uses. */
export interface CompletionClient {
  generate(request: GenerateRequest, options?: { signal?: AbortSignal }): AsyncIterable<GenerateEvent>;
  tokenize(text: string, options?: { model?: string; add_special?: boolean; signal?: AbortSignal }): Promise<TokenizeResult>;
}

/** VS Code's `CancellationToken`, structurally. */
export interface CancellationLike {
  readonly isCancellationRequested: boolean;
  onCancellationRequested(listener: () => void): { dispose(): void };
}

export interface CompletionSettings {
  /** Model name; the daemon's default when empty. */
  model?: string;
  maxTokens: number;
  temperature: number;
  /** More sampling parameters (`top_p`, `top_k`, `min_p`, `repetition_penalty`, `seed`, ...). */
  sampling?: Sampling;
  plugins: PluginUse[];
  debounceMs: number;
  /** Characters of context before / after the cursor sent to the model. */
  maxPrefixChars: number;
  maxSuffixChars: number;
}

export const DEFAULT_SETTINGS: CompletionSettings = {
  maxTokens: 64,
  temperature: 0,
  plugins: [],
  debounceMs: 250,
  maxPrefixChars: 6000,
  maxSuffixChars: 2000,
};

/** A model family's fill-in-the-middle markers (prefix-suffix-middle order). */
export interface FimFormat {
  name: string;
  prefix: string;
  suffix: string;
  middle: string;
  /** More special strings after which the model has left the hole. */
  stop: string[];
}

/** The FIM conventions tried, in order. */
export const FIM_FORMATS: readonly FimFormat[] = [
  // StarCoder, SmolLM-style code tokenizers, Granite code.
  { name: "starcoder", prefix: "<fim_prefix>", suffix: "<fim_suffix>", middle: "<fim_middle>", stop: ["<|endoftext|>", "<file_sep>", "<fim_pad>"] },
  // Qwen2.5-Coder, CodeGemma.
  { name: "qwen", prefix: "<|fim_prefix|>", suffix: "<|fim_suffix|>", middle: "<|fim_middle|>", stop: ["<|endoftext|>", "<|file_sep|>", "<|fim_pad|>", "<|file_separator|>"] },
  // DeepSeek-Coder.
  { name: "deepseek", prefix: "<｜fim▁begin｜>", suffix: "<｜fim▁hole｜>", middle: "<｜fim▁end｜>", stop: ["<｜end▁of▁sentence｜>", "<|EOT|>"] },
];

/** The first FIM convention whose three markers each encode to one token id, or null. */
export async function detectFim(client: CompletionClient, model?: string, signal?: AbortSignal): Promise<FimFormat | null> {
  for (const f of FIM_FORMATS) {
    const ids = await Promise.all(
      [f.prefix, f.suffix, f.middle].map((t) => client.tokenize(t, { model: model || undefined, add_special: false, signal })),
    );
    if (ids.every((r) => r.tokens.length === 1) && new Set(ids.map((r) => r.tokens[0])).size === 3) return f;
  }
  return null;
}

/** What is around the cursor. */
export interface CompletionContext {
  /** Text before the cursor. */
  prefix: string;
  /** Text after the cursor. */
  suffix: string;
}

export interface BuiltPrompt {
  prompt: string;
  stop: string[];
  mode: "fim" | "prefix";
  /** Only the rest of the current line is wanted (there is code after the cursor on it). */
  singleLine: boolean;
}

/**
 * The prompt and stop strings for a completion. FIM: `PRE prefix SUF suffix MID`; otherwise the
 * prefix alone. Completions stop at a blank line (one block at a time) or, when code follows the
 * cursor on its line, at the end of the line.
 */
export function buildPrompt(ctx: CompletionContext, fim: FimFormat | null, settings: Pick<CompletionSettings, "maxPrefixChars" | "maxSuffixChars"> = DEFAULT_SETTINGS): BuiltPrompt {
  const prefix = ctx.prefix.slice(Math.max(0, ctx.prefix.length - settings.maxPrefixChars));
  const suffix = ctx.suffix.slice(0, settings.maxSuffixChars);
  const restOfLine = suffix.split("\n", 1)[0];
  const singleLine = restOfLine.trim().length > 0;
  const stop = [singleLine ? "\n" : "\n\n"];
  if (fim) {
    return {
      prompt: `${fim.prefix}${prefix}${fim.suffix}${suffix}${fim.middle}`,
      stop: [...stop, fim.prefix, fim.suffix, fim.middle, ...fim.stop],
      mode: "fim",
      singleLine,
    };
  }
  // Chat-tuned models drift into prose or markdown once the code ends.
  return { prompt: prefix, stop: [...stop, "```", "<|endoftext|>", "<|im_end|>", "<|im_start|>"], mode: "prefix", singleLine };
}

/**
 * Cleans a raw completion: no doubled blank after the space or indentation the user typed
 * (BPE tokenizers put the space in front of the next word: `    ` then ` return`), no empty
 * first line after typed indentation, no trailing
 * whitespace, and nothing that repeats the code after the cursor (the rest of the line, or the
 * next non-blank line, such as a closing brace).
 */
export function postprocess(text: string, ctx: CompletionContext): string {
  let t = text;
  const currentLine = ctx.prefix.slice(ctx.prefix.lastIndexOf("\n") + 1);
  // On a line holding only the indentation typed so far, a completion that starts on the next
  // line belongs on this one.
  if (currentLine && !currentLine.trim() && /^\s*\n/.test(t)) t = t.replace(/^\s*\n/, "");
  if (/[ \t]$/.test(ctx.prefix)) t = t.replace(/^[ \t]+/, "");
  t = t.replace(/\s+$/, "");
  const lines = ctx.suffix.split("\n");
  const rest = lines[0].trim();
  if (rest) {
    if (t.endsWith(rest)) t = t.slice(0, t.length - rest.length).replace(/\s+$/, "");
    return t;
  }
  const next = lines.slice(1).find((l) => l.trim())?.trim();
  if (next) {
    const out = t.split("\n");
    const cut = out.findIndex((l, i) => i > 0 && l.trim() === next);
    if (cut > 0) t = out.slice(0, cut).join("\n").replace(/\s+$/, "");
  }
  return t;
}

/** One request's course, for logs and tests. */
export type CompletionEvent =
  | { type: "debounced"; seq: number }
  | { type: "sent"; seq: number; mode: "fim" | "prefix"; prompt: string }
  | { type: "token"; seq: number; text: string }
  | { type: "done"; seq: number; finishReason: string; completionTokens: number }
  | { type: "error"; seq: number; error: unknown };

export interface CompletionResult {
  text: string;
  mode: "fim" | "prefix";
  finishReason: string;
}

export interface EngineDeps {
  /** The connected client (created lazily by the caller). */
  client(): Promise<CompletionClient>;
  settings(): CompletionSettings;
  onEvent?(e: CompletionEvent): void;
}

/** The request's `sampling`: the extra parameters plus the temperature; undefined when greedy and empty. */
export function samplingOf(settings: { temperature: number; sampling?: Sampling }): Sampling | undefined {
  const s: Sampling = { ...(settings.sampling ?? {}) };
  if (settings.temperature > 0) s.temperature = settings.temperature;
  return Object.keys(s).length ? s : undefined;
}

function sleep(ms: number, signal: AbortSignal): Promise<boolean> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve(false);
    const t = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve(true);
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      resolve(false);
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/** Serves inline completion requests one at a time, newest first. */
export class CompletionEngine {
  #deps: EngineDeps;
  #current: { controller: AbortController; key?: string } | undefined;
  #fim = new Map<string, Promise<FimFormat | null>>();
  #seq = 0;

  constructor(deps: EngineDeps) {
    this.#deps = deps;
  }

  /** Cancels the request in flight (all of them, or only the one for document `key`). */
  cancelPending(key?: string): void {
    const c = this.#current;
    if (!c || (key !== undefined && c.key !== undefined && c.key !== key)) return;
    c.controller.abort();
    this.#current = undefined;
  }

  /** Forgets which FIM convention each model uses (after a model or endpoint change). */
  resetModelInfo(): void {
    this.#fim.clear();
  }

  /** The FIM convention of `model` (cached), or null for prefix-only prompts. */
  fimFor(client: CompletionClient, model: string | undefined): Promise<FimFormat | null> {
    const k = model || "";
    let p = this.#fim.get(k);
    if (!p) {
      p = detectFim(client, model);
      this.#fim.set(k, p);
      p.catch(() => this.#fim.delete(k)); // retry after a failure
    }
    return p;
  }

  /**
   * A completion for the cursor position, or undefined when the request was superseded,
   * cancelled, or produced nothing. `key` names the document (for `cancelPending(key)`).
   */
  async complete(ctx: CompletionContext, token?: CancellationLike, key?: string): Promise<CompletionResult | undefined> {
    this.cancelPending(); // a newer request makes the previous one stale
    const controller = new AbortController();
    const mine = { controller, key };
    this.#current = mine;
    const seq = ++this.#seq;
    const emit = (e: CompletionEvent) => this.#deps.onEvent?.(e);
    const sub = token?.onCancellationRequested(() => controller.abort());
    if (token?.isCancellationRequested) controller.abort();
    const { signal } = controller;
    try {
      const settings = this.#deps.settings();
      if (!(await sleep(settings.debounceMs, signal))) {
        emit({ type: "debounced", seq });
        return undefined;
      }
      const client = await this.#deps.client();
      const fim = await this.fimFor(client, settings.model);
      if (signal.aborted) {
        emit({ type: "debounced", seq });
        return undefined;
      }
      const built = buildPrompt(ctx, fim, settings);
      if (!built.prompt) return undefined; // an empty file and no FIM: nothing to continue
      const request: GenerateRequest = {
        prompt: built.prompt,
        max_tokens: settings.maxTokens,
        stop: built.stop.slice(0, 16),
        sampling: samplingOf(settings),
      };
      if (settings.model) request.model = settings.model;
      if (settings.plugins.length) request.plugins = settings.plugins;
      emit({ type: "sent", seq, mode: built.mode, prompt: built.prompt });
      let text = "";
      let finishReason = "";
      for await (const ev of client.generate(request, { signal })) {
        if (ev.type === "token") {
          text += ev.text;
          emit({ type: "token", seq, text: ev.text });
        } else if (ev.type === "done") {
          finishReason = ev.finish_reason;
          emit({ type: "done", seq, finishReason, completionTokens: ev.usage.completion_tokens });
        }
      }
      if (finishReason === "cancelled" || signal.aborted) return undefined;
      const out = postprocess(text, ctx);
      return out ? { text: out, mode: built.mode, finishReason } : undefined;
    } catch (error) {
      if (signal.aborted) return undefined;
      emit({ type: "error", seq, error });
      throw error;
    } finally {
      sub?.dispose();
      if (this.#current === mine) this.#current = undefined;
    }
  }
}
