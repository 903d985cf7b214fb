// Reply actions and Digishare's limits: the TypeScript twin of
// protocol/src/lib.rs, builders.rs and validate.rs. Every constructor checks
// the limits and throws a LimitError with the same sentence the Rust SDK and
// the host use; digibot checks every action again on its side.

import { charCount, isBlank, limits, longerThan } from "./limits";
import type {
  Action as WitAction,
  Button,
  ButtonsReply,
  FileReply,
  ListReply,
  ListRow,
  ListSection,
  Location,
} from "./wit";

/** One reply: the WIT `action` variant, `{ tag: "text", val: { body } }` etc. */
export type Action = WitAction;

/** Why an action would be refused by Digishare (or is unsafe to send). */
export type LimitReason =
  | { kind: "too-long"; field: string; max: number; len: number }
  | { kind: "empty"; field: string }
  | { kind: "too-many"; what: string; max: number; count: number }
  | { kind: "no-items"; what: string }
  | { kind: "duplicate-id"; id: string }
  | { kind: "bad-id"; field: string }
  | { kind: "bad-url" }
  | { kind: "bad-coordinates" };

function describe(r: LimitReason): string {
  switch (r.kind) {
    case "too-long":
      return `${r.field} is ${r.len} characters, the limit is ${r.max}`;
    case "empty":
      return `${r.field} must not be empty`;
    case "too-many":
      return `${r.count} ${r.what}, the limit is ${r.max}`;
    case "no-items":
      return `at least one of ${r.what} is needed`;
    case "duplicate-id":
      return `id ${JSON.stringify(r.id)} is used twice`;
    case "bad-id":
      return `${r.field} may only hold letters, digits, '-', '_', '.' and ':' (at most ${limits.REF_ID_MAX})`;
    case "bad-url":
      return "file url must start with https:// or http://";
    case "bad-coordinates":
      return "latitude must be within ±90 and longitude within ±180";
  }
}

/**
 * A broken limit. `message` is the sentence digibot logs (the same as the
 * Rust SDK's), `reason` the details. Thrown by every constructor; uncaught
 * in a handler, it becomes the event's error.
 */
export class LimitError extends Error {
  readonly reason: LimitReason;
  constructor(reason: LimitReason) {
    super(describe(reason));
    this.name = "LimitError";
    this.reason = reason;
  }
}

function text(field: string, value: string, max: number): void {
  if (typeof value !== "string" || isBlank(value)) {
    throw new LimitError({ kind: "empty", field });
  }
  if (longerThan(value, max)) throw new LimitError({ kind: "too-long", field, max, len: charCount(value) });
}

function header(value: string | undefined): void {
  if (value != null) text("header", value, limits.HEADER_MAX);
}

// Ids that end up in a URL path or a `reply_to`: a strict charset
// (A-Z a-z 0-9 - _ . :), so a plugin cannot steer a request to another
// conversation's route.
function plainId(value: string): boolean {
  if (value.length === 0 || value.length > limits.REF_ID_MAX || value === "." || value === "..") return false;
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i);
    const ok =
      (c >= 0x30 && c <= 0x3a) || // 0-9 and ':'
      (c >= 0x41 && c <= 0x5a) ||
      (c >= 0x61 && c <= 0x7a) ||
      c === 0x2d || // -
      c === 0x2e || // .
      c === 0x5f; // _
    if (!ok) return false;
  }
  return true;
}

function reference(field: string, value: string): void {
  if (typeof value !== "string" || !plainId(value)) throw new LimitError({ kind: "bad-id", field });
}

function uniqueIds(ids: string[]): void {
  const seen = new Set<string>();
  for (const id of ids) {
    if (seen.has(id)) throw new LimitError({ kind: "duplicate-id", id });
    seen.add(id);
  }
}

function checkButtons(b: ButtonsReply): void {
  header(b.header);
  text("body", b.body, limits.TEXT_MAX);
  if (b.buttons.length === 0) throw new LimitError({ kind: "no-items", what: "buttons" });
  if (b.buttons.length > limits.BUTTONS_MAX) {
    throw new LimitError({ kind: "too-many", what: "buttons", max: limits.BUTTONS_MAX, count: b.buttons.length });
  }
  for (const button of b.buttons) {
    text("button id", button.id, limits.CHOICE_ID_MAX);
    text("button title", button.title, limits.BUTTON_TITLE_MAX);
  }
  uniqueIds(b.buttons.map((x) => x.id));
}

function checkList(l: ListReply): void {
  header(l.header);
  text("body", l.body, limits.TEXT_MAX);
  text("list button", l.button, limits.BUTTON_TITLE_MAX);
  const rows = l.sections.reduce((n, s) => n + s.rows.length, 0);
  if (rows === 0) throw new LimitError({ kind: "no-items", what: "list rows" });
  if (rows > limits.LIST_ROWS_MAX) {
    throw new LimitError({ kind: "too-many", what: "list rows", max: limits.LIST_ROWS_MAX, count: rows });
  }
  for (const section of l.sections) {
    // WhatsApp needs section titles only when there are several.
    if (l.sections.length > 1) text("section title", section.title, limits.ROW_TITLE_MAX);
    for (const row of section.rows) {
      text("row id", row.id, limits.CHOICE_ID_MAX);
      text("row title", row.title, limits.ROW_TITLE_MAX);
    }
  }
  uniqueIds(l.sections.flatMap((s) => s.rows.map((r) => r.id)));
}

/**
 * Checks every limit of an action; the first one broken is thrown. The
 * constructors already call it; it matters for actions written by hand
 * (`{ tag: "text", val: { body } }`).
 */
export function validate(action: Action): void {
  switch (action.tag) {
    case "text":
      text("text", action.val.body, limits.TEXT_MAX);
      if (action.val.replyTo != null) reference("reply_to", action.val.replyTo);
      return;
    case "buttons":
      return checkButtons(action.val);
    case "list":
      return checkList(action.val);
    case "location": {
      const { latitude, longitude } = action.val;
      const ok =
        Number.isFinite(latitude) &&
        Number.isFinite(longitude) &&
        Math.abs(latitude) <= 90 &&
        Math.abs(longitude) <= 180;
      if (!ok) throw new LimitError({ kind: "bad-coordinates" });
      return;
    }
    case "location-request":
      return text("location request", action.val, limits.TEXT_MAX);
    case "file": {
      const url = String(action.val.url).trim();
      if (!url.startsWith("https://") && !url.startsWith("http://")) {
        throw new LimitError({ kind: "bad-url" });
      }
      return;
    }
    case "note":
      return text("note", action.val, limits.TEXT_MAX);
    case "hand-off":
      return reference("user id", action.val.userId);
    default: {
      const never: never = action;
      throw new Error(`unknown action ${JSON.stringify(never)}`);
    }
  }
}

function checked<T extends Action>(action: T): T {
  validate(action);
  return action;
}

/** Builds reply buttons; see {@link Action.buttons}. */
export class ButtonsBuilder {
  #reply: ButtonsReply;
  constructor(body: string) {
    this.#reply = { body, buttons: [] };
  }
  /** A text header above the body (at most 60 characters). */
  header(header: string): this {
    this.#reply.header = header;
    return this;
  }
  /** Adds a button; its `id` comes back as the customer's choice. */
  button(id: string, title: string): this {
    this.#reply.buttons.push({ id, title } satisfies Button);
    return this;
  }
  /** Checks the limits (1-3 buttons, titles ≤ 20, header ≤ 60). */
  build(): Action {
    const { header, body, buttons } = this.#reply;
    return checked({ tag: "buttons", val: { header, body, buttons: buttons.map((b) => ({ ...b })) } });
  }
}

/**
 * Builds a list menu; see {@link Action.list}. Rows added with `row` before
 * any `section` go into one untitled section.
 */
export class ListBuilder {
  #reply: ListReply;
  constructor(body: string, button: string) {
    this.#reply = { body, button, sections: [] };
  }
  /** A text header above the body (at most 60 characters). */
  header(header: string): this {
    this.#reply.header = header;
    return this;
  }
  /** Starts a new titled section; later rows go into it. */
  section(title: string): this {
    this.#reply.sections.push({ title, rows: [] } satisfies ListSection);
    return this;
  }
  /** Adds a row (title at most 24 characters), with an optional second line. */
  row(id: string, title: string, description?: string): this {
    const sections = this.#reply.sections;
    if (sections.length === 0) sections.push({ title: "", rows: [] });
    const row: ListRow = { id, title };
    if (description !== undefined) row.description = description;
    sections[sections.length - 1]!.rows.push(row);
    return this;
  }
  /** Checks the limits (1-10 rows in all, row titles ≤ 24, header ≤ 60). */
  build(): Action {
    const { header, body, button, sections } = this.#reply;
    return checked({
      tag: "list",
      val: { header, body, button, sections: sections.map((s) => ({ title: s.title, rows: s.rows.map((r) => ({ ...r })) })) },
    });
  }
}

/** Builds a file reply with the optional fields {@link Action.file} leaves out. */
export class FileBuilder {
  #reply: FileReply;
  /** A file Digishare downloads from `url` (http or https). */
  constructor(url: string) {
    this.#reply = { url, voice: false };
  }
  /** The name the customer sees, e.g. `facture.pdf`. */
  fileName(fileName: string): this {
    this.#reply.fileName = fileName;
    return this;
  }
  /** The file extension, e.g. `pdf`, when the URL does not make it clear. */
  extension(extension: string): this {
    this.#reply.extension = extension;
    return this;
  }
  /** Deliver an audio file as a voice note. */
  voice(voice = true): this {
    this.#reply.voice = voice;
    return this;
  }
  /** Checks the URL like {@link Action.file} does. */
  build(): Action {
    return checked({ tag: "file", val: { ...this.#reply } });
  }
}

/**
 * The constructors of reply actions, each checked against Digishare's
 * limits (a broken one throws {@link LimitError}). Same names as the Rust
 * SDK's `Action::text`, `Action::buttons`, ... in camelCase.
 *
 * ```ts
 * Action.text("Bonjour !");
 * Action.buttons("Track your order?").button("yes", "Oui").button("no", "Non").build();
 * Action.list("How can we help?", "Menu").section("Orders").row("track", "Track a parcel").build();
 * ```
 */
export const Action = {
  /** A text message (at most 4096 characters, not blank). */
  text(body: string): Action {
    return checked({ tag: "text", val: { body } });
  },
  /** A text message quoting the message `messageId` of this conversation. */
  textReplyTo(body: string, messageId: string): Action {
    return checked({ tag: "text", val: { body, replyTo: messageId } });
  },
  /** Reply buttons: `Action.buttons("Body").button("id", "Title").build()`. */
  buttons(body: string): ButtonsBuilder {
    return new ButtonsBuilder(body);
  },
  /** A list menu: `Action.list("Body", "Open").row("id", "Title").build()`. */
  list(body: string, button: string): ListBuilder {
    return new ListBuilder(body, button);
  },
  /** A location pin. */
  location(latitude: number, longitude: number): Action {
    return checked({ tag: "location", val: { latitude, longitude } satisfies Location });
  },
  /** A named location pin with an address. */
  place(latitude: number, longitude: number, name: string, address: string): Action {
    return checked({ tag: "location", val: { latitude, longitude, name, address } });
  },
  /** Ask the customer to share their location, with a prompt. */
  locationRequest(prompt: string): Action {
    return checked({ tag: "location-request", val: prompt });
  },
  /** A file Digishare fetches from `url` (http or https); see {@link FileBuilder}. */
  file(url: string): Action {
    return checked({ tag: "file", val: { url, voice: false } });
  },
  /** An internal note for the agents; the customer never sees it. */
  note(body: string): Action {
    return checked({ tag: "note", val: body });
  },
  /** Attach the agent `userId`; `asHandler` also makes them the handler. */
  handOff(userId: string, asHandler: boolean): Action {
    return checked({ tag: "hand-off", val: { userId, asHandler } });
  },
};

/** Short name of the action kind, as the host names it in logs (`hand_off`). */
export function actionKind(action: Action): string {
  return action.tag.replace("-", "_");
}
