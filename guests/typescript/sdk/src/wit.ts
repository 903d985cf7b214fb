// The one file that names the WIT version the SDK is built against.
//
// The declarations come from `jco guest-types` run on the WIT folder that
// scripts/build-typescript-plugins builds against (wit/since_v0.3.0 today);
// the script writes them to target/guests/ts-bindings/ and the tsconfig
// files point there. Moving the SDK to a newer `digishare:bot` version means
// changing the specifiers below (and the WIT folder in the script), nothing
// else in the SDK.
//
// Named imports only: componentize-js binds the host functions a module
// imports by name.

export { log as hostLog } from "digishare:bot/log@0.3.0";
export type { Level } from "digishare:bot/log@0.3.0";
export { get as configGet } from "digishare:bot/config@0.3.0";
export {
  get as kvGet,
  set as kvSet,
  delete as kvDelete,
  getIn as kvGetIn,
  setIn as kvSetIn,
  deleteIn as kvDeleteIn,
} from "digishare:bot/kv@0.3.0";
export type { Scope as KvScope } from "digishare:bot/kv@0.3.0";
export { lastRefusal } from "digishare:bot/outbound@0.3.0";
export { schedule as timerSchedule, cancel as timerCancel } from "digishare:bot/timers@0.3.0";
export type { ScheduleOptions } from "digishare:bot/timers@0.3.0";
export { history as conversationHistory } from "digishare:bot/conversation@0.3.0";
export type { Author, HistoryEntry as WitHistoryEntry } from "digishare:bot/conversation@0.3.0";
export type { Refusal } from "digishare:bot/outbound@0.3.0";

export type * from "digishare:bot/types@0.3.0";

import type * as World from "digishare:bot/bot-with-timers@0.3.0";

/**
 * What the component's top-level module exports, per the world
 * `bot-with-timers` (scripts/build-typescript-plugins gives an export the
 * plugin leaves out a handler that returns no actions).
 */
export type WorldExports = Pick<typeof World, "onNewConversation" | "onMessage" | "onTimer" | "onResume">;

/** The `digishare:bot` version these bindings were generated from. */
export const WIT_VERSION = "0.3.0";
