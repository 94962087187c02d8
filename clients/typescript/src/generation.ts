import { RequestError } from "./errors.js";
import type { DoneEvent, GenerateEvent, ServerMessage, StartedEvent } from "./protocol.js";

/** Everything one generation produced. */
export interface GenerationResult {
  /** The whole output (all `token` texts concatenated). */
  text: string;
  /** Every generated token id, in order. */
  tokens: number[];
  /** Absent only when the request was cancelled before the daemon admitted it. */
  started: StartedEvent | undefined;
  done: DoneEvent;
}

/** How a generation talks back to its client. @internal */
export interface GenerationHooks {
  /** Sends `cancel` for this id, if the request reached the daemon and has not ended. */
  cancel(): void;
}

/**
 * A running generation: an async iterator of its events (`started`, `token`..., `done`).
 *
 * ```ts
 * for await (const ev of client.generate({ prompt: "Once upon a time", max_tokens: 20 })) {
 *   if (ev.type === "token") process.stdout.write(ev.text);
 * }
 * ```
 *
 * Iteration throws a `RequestError` when the daemon answers with an error, a
 * `DisconnectedError` when the connection drops first, and the signal's reason when the
 * `AbortSignal` fires before the request was sent. Aborting after it was sent (or `cancel()`)
 * makes the daemon stop within one decode step: the stream then ends with `done` /
 * `finish_reason: "cancelled"`. Leaving a `for await` loop early cancels the generation too.
 */
export class Generation implements AsyncIterableIterator<GenerateEvent> {
  /** The request id on the wire. */
  readonly id: string;
  /** The `started` event, once it arrived. */
  started: StartedEvent | undefined;
  /** The `done` event, once it arrived. */
  done: DoneEvent | undefined;

  #queue: GenerateEvent[] = [];
  #error: unknown;
  #failed = false;
  #finished = false; // final event or failure received
  #returned = false; // the iterator ended
  #wake: (() => void) | undefined;
  #hooks: GenerationHooks | undefined;
  #cancelRequested = false;
  #onFinish: (() => void)[] = [];

  /** @internal */
  constructor(id: string) {
    this.id = id;
  }

  /** @internal Called by the client once the request was sent. */
  _attach(hooks: GenerationHooks): void {
    this.#hooks = hooks;
    if (this.#cancelRequested) hooks.cancel();
  }

  /** @internal Runs `f` once the generation has finished (done, error or failure). */
  _onFinish(f: () => void): void {
    if (this.#finished) f();
    else this.#onFinish.push(f);
  }

  /** @internal Whether cancel() was called before the request was sent. */
  get _cancelRequested(): boolean {
    return this.#cancelRequested;
  }

  /** @internal An event for this id. */
  _push(m: ServerMessage): void {
    if (this.#finished) return;
    const keep = !this.#returned; // nobody reads the events of a loop that was left
    switch (m.type) {
      case "started":
        this.started = m;
        if (keep) this.#queue.push(m);
        break;
      case "token":
        if (keep) this.#queue.push(m);
        break;
      case "done":
        this.done = m;
        if (keep) this.#queue.push(m);
        this.#finish();
        break;
      case "error":
        this._fail(new RequestError(m.code, m.message, m.id));
        return;
      default:
        return; // not part of a generation; ignore
    }
    this.#wakeUp();
  }

  /** @internal The generation cannot go on (daemon error, disconnect, abort before sending). */
  _fail(error: unknown): void {
    if (this.#finished) return;
    this.#error = error;
    this.#failed = true;
    this.#finish();
    this.#wakeUp();
  }

  #finish(): void {
    this.#finished = true;
    const fs = this.#onFinish;
    this.#onFinish = [];
    for (const f of fs) f();
  }

  #wakeUp(): void {
    const w = this.#wake;
    this.#wake = undefined;
    w?.();
  }

  /** Asks the daemon to stop this generation; the stream then ends with a cancelled `done`. */
  cancel(): void {
    if (this.#finished) return;
    this.#cancelRequested = true;
    this.#hooks?.cancel();
  }

  async next(): Promise<IteratorResult<GenerateEvent>> {
    for (;;) {
      if (this.#returned) return { done: true, value: undefined };
      const ev = this.#queue.shift();
      if (ev) return { done: false, value: ev };
      if (this.#finished) {
        this.#returned = true;
        if (this.#failed) throw this.#error;
        return { done: true, value: undefined };
      }
      await new Promise<void>((resolve) => (this.#wake = resolve));
    }
  }

  /** Leaving a `for await` loop early: cancels the generation on the daemon. */
  async return(): Promise<IteratorResult<GenerateEvent>> {
    if (!this.#finished) this.cancel();
    this.#returned = true;
    this.#queue = [];
    return { done: true, value: undefined };
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  /** Reads the whole generation and returns its text, tokens and final event. */
  async collect(onText?: (text: string) => void): Promise<GenerationResult> {
    let text = "";
    const tokens: number[] = [];
    for await (const ev of this) {
      if (ev.type === "token") {
        text += ev.text;
        tokens.push(...ev.tokens);
        if (ev.text) onText?.(ev.text);
      }
    }
    if (!this.done) throw new Error(`generation ${this.id} ended without a done event`);
    return { text, tokens, started: this.started, done: this.done };
  }
}
