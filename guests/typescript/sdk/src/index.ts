/// <reference path="./globals.d.ts" />
/**
 * digibot-sdk for TypeScript: write a digibot plugin as a componentize-js
 * component. The twin of the Rust `digibot-sdk` (guest-sdk/):
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
 *
 * See docs/typescript.md.
 */

export { Action, ButtonsBuilder, FileBuilder, LimitError, ListBuilder, actionKind, validate } from "./actions";
export type { LimitReason } from "./actions";
export { BotError, defineBot } from "./bot";
export type { Answer, Bot, BotExports, Replies } from "./bot";
export { Message } from "./events";
export type { Conversation, ReleaseCause, Resume, SharedLocation, Timer } from "./events";
export { config, history, kv, log, outbound, timers } from "./host";
export type { HistoryEntry, KvIn, KvSetOptions, ScheduleOptions } from "./host";
export { charCount, limits } from "./limits";
export { WIT_VERSION } from "./wit";
export type {
  Button,
  ButtonsReply,
  Choice,
  Contact,
  Content,
  ConversationState,
  FileReply,
  HandOff,
  Level,
  ListReply,
  ListRow,
  ListSection,
  Location,
  Media,
  MediaKind,
  MessageEvent,
  NewConversationEvent,
  Phone,
  ResumeEvent,
  Sender,
  SenderKind,
  TextReply,
  TimerEvent,
  UnknownContent,
} from "./wit";
