/**
 * The limits of Digishare's Messages API (and of WhatsApp behind it), the
 * same numbers as `protocol/src/lib.rs` (`digibot_protocol::limits`).
 *
 * Lengths count characters (Unicode code points, as Rust counts `char`s),
 * not bytes and not UTF-16 code units: "é" is 1, "👋" is 1.
 */
export const limits = {
  /** Characters in a text message. */
  TEXT_MAX: 4096,
  /** Characters in the header of a buttons or list message. */
  HEADER_MAX: 60,
  /** Reply buttons in one message. */
  BUTTONS_MAX: 3,
  /** Characters in a reply button's title. */
  BUTTON_TITLE_MAX: 20,
  /** Rows in a list menu, across all its sections. */
  LIST_ROWS_MAX: 10,
  /** Characters in a list row's title. */
  ROW_TITLE_MAX: 24,
  /** Characters in a button or row id (what comes back as the choice). */
  CHOICE_ID_MAX: 200,
  /** Characters in an id digibot puts into a URL path or a `reply_to`. */
  REF_ID_MAX: 128,
} as const;

/** Characters as Digishare counts them: code points, like Rust's `chars()`. */
export function charCount(value: string): number {
  let n = 0;
  for (const _ of value) n++;
  return n;
}

// Rust's `str::trim` whitespace (Unicode White_Space), which is not quite
// JavaScript's: U+0085 is whitespace there, U+FEFF is not.
const BLANK = /^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$/;

/** True when `value` is empty or only whitespace, as the host judges it. */
export function isBlank(value: string): boolean {
  return BLANK.test(value);
}
