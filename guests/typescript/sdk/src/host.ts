// kv, config and log: the host functions of digishare:bot, as the Rust SDK
// wraps them (guest-sdk/src/lib.rs). They call into digibot, so they work
// only inside a plugin, during an event: not at the module's top level,
// which componentize-js runs once at build time (Wizer pre-initialisation).

import { BotError } from "./bot";
import {
  configGet,
  conversationHistory,
  hostLog,
  kvDelete,
  kvDeleteIn,
  kvGet,
  kvGetIn,
  kvSet,
  kvSetIn,
  type KvScope,
  lastRefusal,
  timerCancel,
  timerSchedule,
  type Author,
  type Level,
  type Refusal,
} from "./wit";

/** A `result` import's `err`, which componentize-js throws, as a BotError. */
function hostError(e: unknown): BotError {
  // componentize-js throws the `err` of a `result` import as an Error
  // whose `payload` is the WIT error value.
  const payload = (e as { payload?: unknown } | null)?.payload;
  return new BotError(typeof payload === "string" ? payload : String(e));
}

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
 * State kept between events, private to this plugin.
 * `get`, `set` and `delete` reach the conversation of the event being
 * handled; `kv.customer` and `kv.plugin` reach wider scopes. Writes are
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
      throw hostError(e);
    }
  },
  /** Forgets `key` in this conversation. */
  delete(key: string): void {
    kvDelete(key);
  },
  /** (this plugin, the event's conversation), with TTLs. */
  conversation: scoped("conversation"),
  /**
   * (this plugin, the event's customer): kept across the customer's
   * conversations. Its calls throw `unknown: ...` when digibot does not
   * know the event's customer.
   */
  customer: scoped("customer"),
  /**
   * (this plugin): shared by all of its conversations. Two conversations
   * may write a key at once: the last committed write wins.
   */
  plugin: scoped("plugin"),
};

/** Options of {@link KvIn.set}. */
export interface KvSetOptions {
  /** The value reads as absent this many ms from now (1 ms to 365 days). */
  ttlMs?: number;
}

/** One of this plugin's KV scopes (see docs/kv.md), as the Rust SDK's `kv::Scope`. */
export interface KvIn {
  /** The value of `key` here, `undefined` when absent or expired. */
  get(key: string): string | undefined;
  /** Stores `value` under `key` here; throws a {@link BotError} on a limit or quota. */
  set(key: string, value: string, options?: KvSetOptions): void;
  /** Forgets `key` here. */
  delete(key: string): void;
}

function scoped(scope: KvScope): KvIn {
  return {
    get(key) {
      try {
        return kvGetIn(scope, key);
      } catch (e) {
        throw hostError(e);
      }
    },
    set(key, value, options) {
      const ttl = options?.ttlMs;
      try {
        kvSetIn(scope, key, value, { ttlMs: ttl === undefined ? undefined : BigInt(Math.max(0, Math.floor(ttl))) });
      } catch (e) {
        throw hostError(e);
      }
    },
    delete(key) {
      try {
        kvDeleteIn(scope, key);
      } catch (e) {
        throw hostError(e);
      }
    },
  };
}

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

/** How {@link timers.schedule} treats a timer (both off by default). */
export interface ScheduleOptions {
  /** Drop the timer when the customer writes before it is due. */
  cancelOnCustomerMessage?: boolean;
  /**
   * Replace a pending timer of the same name (the default); `false` makes
   * scheduling a pending name fail with `exists: ...`.
   */
  replace?: boolean;
}

/**
 * Durable timers in this conversation, private to this plugin: when one
 * comes due digibot calls `onTimer` (export it too). Schedules and cancels
 * take effect only if the handler succeeds. Names are 1 to 64 bytes,
 * payloads at most 4 KiB, delays at most 30 days, 16 pending per
 * conversation. See docs/timers.md.
 */
export const timers = {
  /**
   * Schedules `name` to come due `afterMs` from now, with `payload`;
   * returns its id. Throws a {@link BotError} with digibot's reason
   * (`limit: ...`, `quota: ...`, `exists: ...`).
   */
  schedule(name: string, afterMs: number, payload = "", options: ScheduleOptions = {}): string {
    if (!Number.isSafeInteger(afterMs) || afterMs < 0) {
      throw new BotError(`limit: a timer's delay is a whole number of ms, not ${afterMs}`);
    }
    try {
      return timerSchedule(name, BigInt(afterMs), payload, {
        cancelOnCustomerMessage: options.cancelOnCustomerMessage ?? false,
        replace: options.replace ?? true,
      });
    } catch (e) {
      throw hostError(e);
    }
  },
  /** A follow-up: scheduled like {@link timers.schedule}, dropped if the customer writes first. */
  followUp(name: string, afterMs: number, payload = ""): string {
    return timers.schedule(name, afterMs, payload, { cancelOnCustomerMessage: true });
  },
  /** Cancels the pending timer `name`, if any. */
  cancel(name: string): void {
    timerCancel(name);
  },
};

/** One message of the conversation, as {@link history} returns it. */
export interface HistoryEntry {
  /** `customer`, `agent`, `bot` or `system`. */
  readonly author: Author;
  /** `text`, `location`, `button_reply`, ... (`note` for internal notes). */
  readonly kind: string;
  /** The text, when it has one. */
  readonly text?: string;
  /** When digibot received or queued it (ms since the epoch). */
  readonly at: number;
}

/**
 * The conversation's last `limit` messages (at most 50), oldest first: the
 * customer's, the agents' and the bot's. The message being handled is the
 * last; this turn's replies are not in it yet. 8 calls per event.
 */
export function history(limit: number): HistoryEntry[] {
  const n = Number.isFinite(limit) ? Math.max(0, Math.min(Math.trunc(limit), 50)) : 50;
  return conversationHistory(n).map((e) => ({
    author: e.author,
    kind: e.kind,
    ...(e.text === undefined ? {} : { text: e.text }),
    at: Number(e.at),
  }));
}
