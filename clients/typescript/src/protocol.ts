/**
 * The mlxd wire protocol, version 1 (`docs/protocol.md`, `docs/protocol.schema.json`), as
 * TypeScript types. Field names are the wire names (snake_case), so a request object is sent as
 * is. The daemon may add fields within a version; the result types allow for that.
 */

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;

// ---------------------------------------------------------------------------------------------
// Shared pieces

/** A chat message, rendered with the model's chat template. */
export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool";
  content: string;
}

/** Sampling parameters; every field is optional and the defaults switch the stage off (greedy). */
export interface Sampling {
  /** >= 0; 0 = greedy (argmax). */
  temperature?: number;
  /** 0 .. vocabulary size; 0 = off. */
  top_k?: number;
  /** (0, 1]; nucleus sampling. */
  top_p?: number;
  /** [0, 1]; drop tokens below min_p x the best one's probability. */
  min_p?: number;
  /** (0, 1]; locally typical sampling. */
  typical_p?: number;
  /** > 0; divide positive / multiply negative logits of recent tokens. */
  repetition_penalty?: number;
  /** 1-4096 recent tokens (prompt + output) the repetition penalty looks at. */
  repetition_context_size?: number;
  /** [-2, 2], OpenAI semantics. */
  presence_penalty?: number;
  /** [-2, 2], OpenAI semantics. */
  frequency_penalty?: number;
  /** `{"token id": bias}`, bias in [-100, 100]. */
  logit_bias?: Record<string, number>;
  /** Makes sampling reproducible (u64). */
  seed?: number;
}

/**
 * A sampler plugin named by a request (see `plugins`; at most 8 per request). A `sampler` kind
 * plugin replaces temperature, the filters and the draw, and cannot be combined with `top_k`,
 * `top_p`, `min_p` or `typical_p`.
 */
export interface PluginUse {
  name: string;
  /** A JSON object the plugin's `params_schema` accepts. */
  params?: unknown;
}

/** The stable error codes of `error` events. */
export type ErrorCode =
  | "invalid_message"
  | "invalid_request"
  | "duplicate_id"
  | "unknown_model"
  | "model_load_failed"
  | "busy"
  | "out_of_memory"
  | "plugin_error"
  | "frame_too_large"
  | "shutting_down"
  | "internal";

/** Why a generation ended. */
export type FinishReason = "stop" | "length" | "cancelled";

// ---------------------------------------------------------------------------------------------
// Client -> server

/** The body of a generation request, without `type` and `id` (the client adds them). */
export type GenerateRequest = GenerateCommon & ({ prompt: string; messages?: never } | { messages: ChatMessage[]; prompt?: never });

/** Fields shared by prompt and chat generations. */
export interface GenerateCommon {
  /** A model name from `models`; the daemon's default model when absent. */
  model?: string;
  /** >= 1; at most the daemon's `[limits] max_tokens`. */
  max_tokens?: number;
  /** Up to 16 strings of 1-256 bytes; generation ends before the first, which is not returned. */
  stop?: string[];
  sampling?: Sampling;
  /** 0-20: report the chosen token's log-probability and the top-n alternatives. */
  logprobs?: number;
  plugins?: PluginUse[];
}

export type GenerateMessage = { type: "generate"; id: string } & GenerateRequest;
export interface CancelMessage { type: "cancel"; id: string }
export interface TokenizeMessage { type: "tokenize"; id: string; text: string; model?: string; add_special?: boolean }
export interface DetokenizeMessage { type: "detokenize"; id: string; tokens: number[]; model?: string }
export interface ModelsMessage { type: "models"; id: string }
export interface LoadMessage { type: "load"; id: string; model: string }
export interface UnloadMessage { type: "unload"; id: string; model: string }
export interface PluginsMessage { type: "plugins"; id: string }
/** Rescans the daemon's plugin directories (as SIGHUP does); answered with the `plugins` listing. */
export interface ReloadPluginsMessage { type: "reload_plugins"; id: string }
export interface StatusMessage { type: "status"; id: string }

/** Every message a client sends. */
export type ClientMessage =
  | GenerateMessage
  | CancelMessage
  | TokenizeMessage
  | DetokenizeMessage
  | ModelsMessage
  | LoadMessage
  | UnloadMessage
  | PluginsMessage
  | ReloadPluginsMessage
  | StatusMessage;

// ---------------------------------------------------------------------------------------------
// Server -> client

export interface Capabilities {
  messages: string[];
  chat_templates: boolean;
  /** The largest `logprobs` a request may ask for. */
  logprobs: number;
  sampling: string[];
  plugins: boolean;
  /** The plugin ABI version the daemon loads, e.g. "1.0". */
  plugin_abi?: string;
  max_frame_bytes: number;
  max_tokens: number;
  max_prompt_tokens: number;
  [more: string]: unknown;
}

export interface HelloEvent {
  type: "hello";
  protocol: number;
  server: string;
  default_model: string;
  capabilities: Capabilities;
}

export interface StartedEvent {
  type: "started";
  id: string;
  model: string;
  prompt_tokens: number;
}

export interface TokenLogprobs {
  logprob: number;
  /** The chosen token's own text (special tokens as written). */
  text: string;
  /** The most likely alternatives, best first, each with its own text. */
  top: { token: number; logprob: number; text: string }[];
}

export interface TokenEvent {
  type: "token";
  id: string;
  /** The text these tokens complete; may be "" while a character or stop string is incomplete. */
  text: string;
  tokens: number[];
  logprobs?: TokenLogprobs;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  cached_tokens: number;
}

export interface Timings {
  time_to_first_token_ms: number;
  tokens_per_second: number;
  total_ms: number;
}

export interface DoneEvent {
  type: "done";
  id: string;
  finish_reason: FinishReason;
  usage: Usage;
  timings: Timings;
}

export interface ResultEvent<T = unknown> {
  type: "result";
  id: string;
  data: T;
}

export interface ErrorEvent {
  type: "error";
  /** Present whenever the daemon could read the request's id. */
  id?: string;
  code: ErrorCode;
  message: string;
}

/** Every message the daemon sends. */
export type ServerMessage = HelloEvent | StartedEvent | TokenEvent | DoneEvent | ResultEvent | ErrorEvent;

/** The events a generation yields, in order: `started`, any number of `token`, one `done`. */
export type GenerateEvent = StartedEvent | TokenEvent | DoneEvent;

// ---------------------------------------------------------------------------------------------
// Result payloads

export interface TokenizeResult { model: string; tokens: number[] }
export interface DetokenizeResult { model: string; text: string }

export interface ModelInfo {
  name: string;
  path: string;
  loaded: boolean;
  default: boolean;
  /** Resident bytes; null while not loaded. */
  bytes: number | null;
  loaded_for_s: number | null;
  in_flight: number | null;
  keep_alive_s: number;
  [more: string]: unknown;
}

export interface ModelsResult {
  models: ModelInfo[];
  memory_budget_bytes: number;
  [more: string]: unknown;
}

export interface LoadResult { model: string; loaded: boolean; ms: number }
export interface UnloadResult { model: string; unloaded: boolean }

export interface PluginInfo {
  name: string;
  version: string;
  /** `processor` (edits logits, in request order) or `sampler` (draws the token). */
  kind: "processor" | "sampler" | (string & {});
  description: string;
  params_schema: unknown;
  capabilities: Record<string, boolean>;
  abi: string;
  file: string;
  [more: string]: unknown;
}

export interface PluginsResult {
  /** The plugin ABI version the daemon speaks. */
  abi: string;
  dirs: string[];
  plugins: PluginInfo[];
  /** Files in the plugin directories that were not loaded, and why. */
  refused: { file: string; error: string }[];
  [more: string]: unknown;
}

export interface ResidentModelStatus {
  name: string;
  running: number;
  queued: number;
  requests: number;
  tokens: number;
  decode_steps: number;
  mean_batch: number;
  mean_ttft_ms: number;
  kv_cache_bytes: number;
  [more: string]: unknown;
}

export interface StatusResult {
  server: string;
  uptime_s: number;
  connections: number;
  requests_total: number;
  errors_total: number;
  busy_total: number;
  memory: { active_bytes: number; peak_bytes: number; cache_bytes: number; budget_bytes: number };
  resident_models: ResidentModelStatus[];
  /** What `mlxd doctor` prints: MLX version, backend, device. */
  runtime: { mlx_version?: string; backend?: string; default_device?: string; [more: string]: unknown };
  [more: string]: unknown;
}
