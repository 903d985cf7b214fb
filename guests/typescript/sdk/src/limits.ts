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

/**
 * Characters as Digishare counts them: code points, like Rust's `chars()`
 * (a surrogate pair is one). Plain loops, no string iterator and no regular
 * expression: in StarlingMonkey, without a JIT, those cost tens to hundreds
 * of microseconds per event (docs/typescript.md, Cost).
 */
export function charCount(value: string): number {
  let n = value.length;
  for (let i = 0; i < value.length - 1; i++) {
    const c = value.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff) {
      const d = value.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        n--;
        i++;
      }
    }
  }
  return n;
}

/** True when `value` has more than `max` characters; counts only when it must. */
export function longerThan(value: string, max: number): boolean {
  // Never fewer UTF-16 units than characters: most strings need no count.
  return value.length > max && charCount(value) > max;
}

// Rust's `str::trim` whitespace (Unicode White_Space), which is not quite
// JavaScript's: U+0085 is whitespace there, U+FEFF is not.
function isSpace(c: number): boolean {
  return (
    (c >= 0x09 && c <= 0x0d) ||
    c === 0x20 ||
    c === 0x85 ||
    c === 0xa0 ||
    c === 0x1680 ||
    (c >= 0x2000 && c <= 0x200a) ||
    c === 0x2028 ||
    c === 0x2029 ||
    c === 0x202f ||
    c === 0x205f ||
    c === 0x3000
  );
}

/** True when `value` is empty or only whitespace, as the host judges it. */
export function isBlank(value: string): boolean {
  for (let i = 0; i < value.length; i++) {
    if (!isSpace(value.charCodeAt(i))) return false;
  }
  return true;
}
