/**
 * A chat conversation kept across `mlxd.chat` invocations, free of the `vscode` module.
 */

import type { ChatMessage, GenerateEvent, GenerateRequest, PluginUse, Sampling } from "@mlxd/client" with { "resolution-mode": "import" };
import { samplingOf } from "./completion";

/** The part of `@mlxd/client`'s `Client` a chat uses. */
export interface ChatClient {
  generate(request: GenerateRequest, options?: { signal?: AbortSignal }): AsyncIterable<GenerateEvent>;
}

export interface ChatSettings {
  model?: string;
  maxTokens: number;
  temperature: number;
  sampling?: Sampling;
  plugins: PluginUse[];
}

export interface ChatAnswer {
  text: string;
  finishReason: string;
  completionTokens: number;
  tokensPerSecond: number;
}

export class ChatSession {
  /** The conversation so far (user and assistant turns). */
  readonly history: ChatMessage[] = [];

  /** A system prompt sent in front of the conversation. */
  system: string | undefined;

  constructor(system?: string) {
    this.system = system || undefined;
  }

  /** Starts a new conversation. */
  reset(): void {
    this.history.length = 0;
  }

  /**
   * Asks `question` with the conversation so far, streaming the answer through `onText`. A
   * cancelled answer stays in the history as far as it got; a failed question is forgotten.
   */
  async ask(client: ChatClient, question: string, settings: ChatSettings, onText: (text: string) => void, signal?: AbortSignal): Promise<ChatAnswer> {
    const messages: ChatMessage[] = [];
    if (this.system) messages.push({ role: "system", content: this.system });
    messages.push(...this.history, { role: "user", content: question });
    const request: GenerateRequest = { messages, max_tokens: settings.maxTokens };
    if (settings.model) request.model = settings.model;
    const sampling = samplingOf(settings);
    if (sampling) request.sampling = sampling;
    if (settings.plugins.length) request.plugins = settings.plugins;
    let text = "";
    let answer: ChatAnswer | undefined;
    for await (const ev of client.generate(request, { signal })) {
      if (ev.type === "token" && ev.text) {
        text += ev.text;
        onText(ev.text);
      } else if (ev.type === "done") {
        answer = { text, finishReason: ev.finish_reason, completionTokens: ev.usage.completion_tokens, tokensPerSecond: ev.timings.tokens_per_second };
      }
    }
    if (!answer) throw new Error("the answer ended without a done event");
    this.history.push({ role: "user", content: question }, { role: "assistant", content: text });
    return answer;
  }
}
