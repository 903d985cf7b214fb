/// <reference path="./globals.d.ts" />
// defineBot: a bot is an object with the handlers it cares about; what
// defineBot returns is what the component's module exports.

import type { Action } from "./actions";
import { LimitError } from "./actions";
import { conversation, Message, resume, timer, type Conversation, type Resume, type Timer } from "./events";
import type { MessageEvent, WorldExports } from "./wit";

/** What a handler may return: the replies, in order (nothing: no reply). */
export type Replies = Action[] | undefined | void;

/**
 * A handler's result: the replies, or a promise of them (an `async`
 * handler that awaits `fetch()`; componentize-js runs the event loop until
 * the promise settles, within the turn's deadline).
 */
export type Answer = Replies | Promise<Replies>;

/**
 * Your bot: implement only the events you care about. Handlers are called
 * on a fresh instance for every event, so keep state in `kv`, not in
 * module variables. Throwing (a {@link BotError}, a {@link LimitError}, any
 * Error) fails the event: nothing of it is sent, and the message is logged
 * by digibot and recorded with the event.
 */
export interface Bot {
  /** A customer opened a conversation. */
  onNewConversation?(conversation: Conversation): Answer;
  /**
   * A customer sent a message (agent and system messages never arrive here,
   * so a bot cannot answer itself in a loop).
   */
  onMessage?(message: Message): Answer;
  /**
   * A timer this bot scheduled with `timers.schedule` came due (see
   * docs/timers.md). Export `onTimer` from your entry module too.
   */
  onTimer?(timer: Timer): Answer;
  /**
   * A human handed the conversation back (release command, operator, idle
   * release): say you are back, or pick up where the bot left off. Export
   * `onResume` from your entry module too.
   */
  onResume?(resume: Resume): Answer;
}

/** A handler's failure with a message for the logs, like the Rust SDK's `Error`. */
export class BotError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BotError";
  }
}

/** The exports of the world `bot`; export them from your entry module. */
export type BotExports = WorldExports;

/**
 * What an exported function throws for the WIT `result`'s `err`:
 * componentize-js turns a thrown value with a `payload` into `err(payload)`.
 */
class ResultError extends Error {
  readonly payload: string;
  constructor(payload: string) {
    super(payload);
    this.payload = payload;
  }
}

/** The reason recorded with a failed event. */
export function reasonOf(e: unknown): string {
  if (e instanceof BotError || e instanceof LimitError) return e.message;
  if (e instanceof Error) {
    // Programming errors keep their kind ("TypeError: ...") and leave their
    // stack in the plugin's output, which digibot logs.
    if (e.stack) console.error(e.stack);
    return e.name === "Error" ? e.message : `${e.name}: ${e.message}`;
  }
  return String(e);
}

function checked(replies: Replies): Action[] {
  if (replies == null) return [];
  if (!Array.isArray(replies)) {
    throw new ResultError(`a handler must return an array of actions, not ${typeof replies}`);
  }
  return replies;
}

function isPromise(x: unknown): x is Promise<Replies> {
  return typeof x === "object" && x !== null && typeof (x as { then?: unknown }).then === "function";
}

function run(handler: () => Answer): Action[] | Promise<Action[]> {
  let answer: Answer;
  try {
    answer = handler();
  } catch (e) {
    throw new ResultError(reasonOf(e));
  }
  if (isPromise(answer)) {
    return answer.then(checked, (e: unknown) => {
      throw new ResultError(reasonOf(e));
    });
  }
  return checked(answer);
}

/**
 * Turns a {@link Bot} into the component's exports:
 *
 * ```ts
 * import { Action, defineBot } from "digibot-sdk";
 *
 * export const { onNewConversation, onMessage, onTimer, onResume } = defineBot({
 *   onMessage(message) {
 *     const text = message.text();
 *     return text === undefined ? [] : [Action.text(text)];
 *   },
 * });
 * ```
 */
export function defineBot(bot: Bot): BotExports {
  // One export per world function: the bot's handler on the SDK's view of
  // the event, or no actions when the bot has none. A new export is one
  // more line here (and in the world's list in the build script).
  function exported<E, V>(handler: ((view: V) => Answer) | undefined, view: (event: E) => V) {
    // A promise when the handler is async: componentize-js awaits an
    // export's promise, running the event loop (fetch) until it settles.
    return (event: E): Action[] => (handler ? run(() => handler.call(bot, view(event))) : []) as Action[];
  }
  return {
    onNewConversation: exported(bot.onNewConversation, conversation),
    onMessage: exported(bot.onMessage, (e: MessageEvent) => new Message(e)),
    onTimer: exported(bot.onTimer, timer),
    onResume: exported(bot.onResume, resume),
  };
}
