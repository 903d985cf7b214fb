// The limits, checked like protocol/src/validate.rs and builders.rs check
// them, with the same error sentences.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Action, FileBuilder, LimitError, actionKind, validate } from "../src/actions";
import { charCount, isBlank, limits } from "../src/limits";

function error(fn: () => unknown): LimitError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof LimitError, `not a LimitError: ${e}`);
    return e as LimitError;
  }
  throw new Error("no error thrown");
}

test("text limit counts characters, not UTF-16 units or bytes", () => {
  assert.deepEqual(Action.text("Bonjour !"), { tag: "text", val: { body: "Bonjour !" } });
  Action.text("é".repeat(limits.TEXT_MAX));
  Action.text("👋".repeat(limits.TEXT_MAX)); // 8192 UTF-16 units, 4096 characters
  const e = error(() => Action.text("a".repeat(limits.TEXT_MAX + 1)));
  assert.deepEqual(e.reason, { kind: "too-long", field: "text", max: 4096, len: 4097 });
  assert.equal(e.message, "text is 4097 characters, the limit is 4096");
});

test("empty text is refused, with Rust's idea of whitespace", () => {
  assert.equal(error(() => Action.text("  ")).message, "text must not be empty");
  assert.equal(error(() => Action.text("")).message, "text must not be empty");
  assert.equal(error(() => Action.text("\u0085\u3000\n")).message, "text must not be empty");
  Action.text("\ufeff"); // not whitespace for str::trim
});

test("reply_to and user ids cannot carry a path", () => {
  Action.textReplyTo("hi", "msg_t_0001");
  for (const bad of ["../conv_2", "a/b", "x?y=1", "", "..", ".", "é", "a".repeat(129)]) {
    assert.equal(error(() => Action.textReplyTo("hi", bad)).reason.kind, "bad-id", bad);
    assert.deepEqual(error(() => Action.handOff(bad, false)).reason, { kind: "bad-id", field: "user id" });
  }
  assert.equal(
    error(() => Action.handOff("a/b", true)).message,
    "user id may only hold letters, digits, '-', '_', '.' and ':' (at most 128)",
  );
  assert.deepEqual(Action.handOff("usr_17", true), { tag: "hand-off", val: { userId: "usr_17", asHandler: true } });
});

test("three buttons pass, four fail, none fails", () => {
  const three = Action.buttons("Pick").button("a", "A").button("b", "B").button("c", "C").build();
  assert.equal(three.tag, "buttons");
  const four = error(() => Action.buttons("Pick").button("a", "A").button("b", "B").button("c", "C").button("d", "D").build());
  assert.deepEqual(four.reason, { kind: "too-many", what: "buttons", max: 3, count: 4 });
  assert.equal(four.message, "4 buttons, the limit is 3");
  const none = error(() => Action.buttons("Pick").build());
  assert.equal(none.message, "at least one of buttons is needed");
  assert.equal(error(() => Action.buttons("Pick").button("a", "A").button("a", "B").build()).message, 'id "a" is used twice');
});

test("button title and header limits", () => {
  const long = error(() => Action.buttons("Pick").button("a", "x".repeat(21)).build());
  assert.deepEqual(long.reason, { kind: "too-long", field: "button title", max: 20, len: 21 });
  Action.buttons("Pick").button("a", "x".repeat(20)).header("h".repeat(60)).build();
  assert.equal(error(() => Action.buttons("Pick").header("h".repeat(61)).button("a", "A").build()).reason.kind, "too-long");
  const built = Action.buttons("Track your order?").header("Suivi").button("yes", "Oui").button("no", "Non").build();
  assert.deepEqual(built, {
    tag: "buttons",
    val: { header: "Suivi", body: "Track your order?", buttons: [{ id: "yes", title: "Oui" }, { id: "no", title: "Non" }] },
  });
});

test("list rows are counted across sections", () => {
  const builder = Action.list("Menu", "Open").section("One");
  for (let i = 0; i < 6; i++) builder.row(`a${i}`, "Row");
  builder.section("Two");
  for (let i = 0; i < 4; i++) builder.row(`b${i}`, "Row");
  builder.build(); // 10 rows is the limit
  const e = error(() => builder.row("b9", "Row").build());
  assert.deepEqual(e.reason, { kind: "too-many", what: "list rows", max: 10, count: 11 });
});

test("row titles, untitled single section, section titles when several", () => {
  const one = Action.list("Menu", "Open").row("a", "x".repeat(24), "second line").build();
  assert.deepEqual(one, {
    tag: "list",
    val: { header: undefined, body: "Menu", button: "Open", sections: [{ title: "", rows: [{ id: "a", title: "x".repeat(24), description: "second line" }] }] },
  });
  assert.deepEqual(error(() => Action.list("Menu", "Open").row("a", "x".repeat(25)).build()).reason, {
    kind: "too-long",
    field: "row title",
    max: 24,
    len: 25,
  });
  assert.equal(error(() => Action.list("Menu", "Open").build()).message, "at least one of list rows is needed");
  const untitled = error(() => Action.list("Menu", "Open").row("a", "A").section("Two").row("b", "B").build());
  assert.equal(untitled.message, "section title must not be empty");
  assert.equal(error(() => Action.list("Menu", "Open").row("a", "A").row("a", "B").build()).reason.kind, "duplicate-id");
  assert.equal(error(() => Action.list("Menu", "x".repeat(21)).row("a", "A").build()).message, "list button is 21 characters, the limit is 20");
});

test("locations, files, notes, location requests", () => {
  Action.location(33.57, -7.59);
  assert.deepEqual(Action.place(33.5731, -7.5898, "Digishare", "Casablanca").val, {
    latitude: 33.5731,
    longitude: -7.5898,
    name: "Digishare",
    address: "Casablanca",
  });
  for (const [lat, lon] of [[91, 0], [0, 181], [NaN, 0], [0, Infinity]] as const) {
    assert.equal(error(() => Action.location(lat, lon)).message, "latitude must be within ±90 and longitude within ±180");
  }
  Action.file("https://example.com/a.pdf");
  assert.equal(error(() => Action.file("file:///etc/passwd")).message, "file url must start with https:// or http://");
  const voice = new FileBuilder("https://example.com/v.ogg").fileName("note.ogg").extension("ogg").voice().build();
  assert.deepEqual(voice, { tag: "file", val: { url: "https://example.com/v.ogg", fileName: "note.ogg", extension: "ogg", voice: true } });
  assert.equal(error(() => new FileBuilder("ftp://x").build()).reason.kind, "bad-url");
  assert.deepEqual(Action.note("VIP customer"), { tag: "note", val: "VIP customer" });
  assert.equal(error(() => Action.note("")).message, "note must not be empty");
  assert.equal(Action.locationRequest("Where are you?").tag, "location-request");
  assert.equal(actionKind(Action.handOff("usr_1", false)), "hand_off");
  assert.equal(actionKind(Action.locationRequest("Where?")), "location_request");
});

test("validate catches hand-written actions", () => {
  const four = {
    tag: "buttons" as const,
    val: { body: "Pick", buttons: [0, 1, 2, 3].map((i) => ({ id: `b${i}`, title: "ok" })) },
  };
  assert.deepEqual(error(() => validate(four)).reason, { kind: "too-many", what: "buttons", max: 3, count: 4 });
  assert.equal(error(() => validate({ tag: "text", val: { body: "hi", replyTo: "../x" } })).message.startsWith("reply_to"), true);
  validate({ tag: "text", val: { body: "hi" } });
});

test("characters are code points; blanks are Rust's whitespace", () => {
  assert.equal(charCount(""), 0);
  assert.equal(charCount("a👋é"), 3);
  assert.equal(charCount("👋👋"), 2);
  assert.equal(charCount("\ud800x"), 2); // a lone surrogate is one
  assert.equal(charCount("x\udc00\ud800"), 3);
  assert.equal(isBlank(""), true);
  assert.equal(isBlank(" \t\r\n\u00a0\u2003\u3000"), true);
  assert.equal(isBlank(" a "), false);
  assert.equal(isBlank("\ufeff"), false);
  const e = error(() => Action.text("👋".repeat(limits.TEXT_MAX + 1)));
  assert.deepEqual(e.reason, { kind: "too-long", field: "text", max: 4096, len: 4097 });
});
