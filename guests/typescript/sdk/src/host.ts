// kv, config and log: the host functions of digishare:bot, as the Rust SDK
// wraps them (guest-sdk/src/lib.rs). They call into digibot, so they work
// only inside a plugin, during an event: not at the module's top level,
// which componentize-js runs once at build time (Wizer pre-initialisation).

import { BotError } from "./bot";
import { configGet, hostLog, kvDelete, kvGet, kvSet, lastRefusal, type Level, type Refusal } from "./wit";

/**
 * Log lines, tagged by digibot with the plugin and conversation. Output per
 * event is capped by the host; past the cap lines are dropped.
 * (`console.log` works too: it is captured as the plugin's output.)
 */
export const log = {
  /** Fine-grained tracing, hidden unless digibot runs with `RUST_LOG=trace`. */
  trace(message: string): void {
    hostLog("trace", message);
  },
  /** Debug detail, hidden unless digibot runs with `RUST_LOG=debug`. */
  debug(message: string): void {
    hostLog("debug", message);
  },
  /** Something worth knowing. */
  info(message: string): void {
    hostLog("info", message);
  },
  /** Something looks wrong but the bot carries on. */
  warn(message: string): void {
    hostLog("warn", message);
  },
  /** Something failed. */
  error(message: string): void {
    hostLog("error", message);
  },
  /** At a level given as a value. */
  at(level: Level, message: string): void {
    hostLog(level, message);
  },
};

/**
 * This plugin's configuration: the `[config]` table of its `NAME.toml`.
 * No other plugin can read it, and digibot's own secrets are never in it.
 */
export const config = {
  /** The value of `key`, if configured. */
  get(key: string): string | undefined {
    return configGet(key);
  },
  /** The value of `key`, or `fallback` when it is not configured. */
  getOr(key: string, fallback: string): string {
    return configGet(key) ?? fallback;
  },
};

/**
 * State kept between events of one conversation, private to this plugin.
 * Every key lives in the conversation of the event being handled. Writes are
 * committed with the event's actions, and only if the handler succeeds.
 * Keys are 1 to 256 bytes, values at most 64 KiB, 256 writes per event.
 */
export const kv = {
  /** The value stored under `key` in this conversation, if any. */
  get(key: string): string | undefined {
    return kvGet(key);
  },
  /**
   * Stores `value` under `key` for this conversation. Throws a
   * {@link BotError} with digibot's reason when the key or value is over
   * its size limits.
   */
  set(key: string, value: string): void {
    try {
      kvSet(key, value);
    } catch (e) {
      // componentize-js throws the `err` of a `result` import as an Error
      // whose `payload` is the WIT error value.
      const payload = (e as { payload?: unknown } | null)?.payload;
      throw new BotError(typeof payload === "string" ? payload : String(e));
    }
  },
  /** Forgets `key` in this conversation. */
  delete(key: string): void {
    kvDelete(key);
  },
};

/**
 * Why digibot refused or failed this turn's latest outbound request
 * (`fetch` only sees a TypeError): `kind` is a stable name such as
 * `not-granted`, `message` a sentence for the logs.
 */
export const outbound = {
  lastRefusal(): Refusal | undefined {
    return lastRefusal();
  },
};
