// defineBot: events in, the world's exports out, errors as the WIT err.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Action, LimitError } from "../src/actions";
import { BotError, defineBot, reasonOf } from "../src/bot";
import type { Content, MessageEvent, NewConversationEvent, ResumeEvent, TimerEvent } from "../src/wit";

function message(content: Content): MessageEvent {
  return {
    eventId: "evt_1",
    message: {
      id: "msg_t_0001",
      conversationId: "conv_1",
      sender: { kind: "customer", name: "Amina", id: "third_1" },
      content,
    },
    state: "bot",
    burst: [],
  };
}

const opened: NewConversationEvent = {
  eventId: "evt_0",
  conversation: { id: "conv_1", customerId: "third_1", customerName: "Amina", channel: "whatsapp" },
  state: "human",
};

function thrown(fn: () => unknown): { payload?: unknown } {
  try {
    fn();
  } catch (e) {
    return e as { payload?: unknown };
  }
  throw new Error("no error thrown");
}

const echo = defineBot({
  onMessage(m) {
    const text = m.text();
    return text === undefined ? [] : [Action.text(text)];
  },
});

test("the echo answers text with text and anything else with nothing", () => {
  assert.deepEqual(echo.onMessage(message({ tag: "text", val: "Salam 👋" })), [{ tag: "text", val: { body: "Salam 👋" } }]);
  for (const content of [
    { tag: "button-reply", val: { id: "yes", title: "Oui" } },
    { tag: "list-reply", val: { id: "r1", title: "Row", description: "d" } },
    { tag: "location", val: { latitude: 33.5, longitude: -7.6 } },
    { tag: "sticker" },
    { tag: "contacts", val: [] },
    { tag: "unsupported", val: ["x"] },
    { tag: "unknown", val: { typeName: "reaction", rawJson: "{}" } },
    { tag: "media", val: { kind: "image", isVoice: false, size: 12n } },
  ] satisfies Content[]) {
    assert.deepEqual(echo.onMessage(message(content)), [], content.tag);
  }
  assert.deepEqual(echo.onNewConversation(opened), []);
});

test("an empty text fails the event like the Rust echo", () => {
  assert.equal(thrown(() => echo.onMessage(message({ tag: "text", val: "" }))).payload, "text must not be empty");
});

test("handlers get the event's fields, state and helpers", () => {
  const seen: unknown[] = [];
  const bot = defineBot({
    onNewConversation(c) {
      seen.push([c.id, c.customerId, c.customerName, c.channel, c.state, c.eventId]);
    },
    onMessage(m) {
      seen.push([m.id, m.conversationId, m.sender.kind, m.state, m.eventId, m.text(), m.choiceId(), m.location()?.latitude]);
      return undefined;
    },
  });
  assert.deepEqual(bot.onNewConversation(opened), []);
  assert.deepEqual(bot.onMessage(message({ tag: "button-reply", val: { id: "yes", title: "Oui" } })), []);
  assert.deepEqual(bot.onMessage(message({ tag: "location", val: { latitude: 33.5, longitude: -7.6 } })), []);
  assert.deepEqual(seen, [
    ["conv_1", "third_1", "Amina", "whatsapp", "human", "evt_0"],
    ["msg_t_0001", "conv_1", "customer", "bot", "evt_1", undefined, "yes", undefined],
    ["msg_t_0001", "conv_1", "customer", "bot", "evt_1", undefined, undefined, 33.5],
  ]);
});

test("errors become the result's err with a readable reason", () => {
  const bot = defineBot({
    onMessage(m) {
      if (m.text() === "bot") throw new BotError("no name");
      if (m.text() === "plain") throw new Error("plain error");
      if (m.text() === "limit") return [Action.buttons("Pick").build()];
      if (m.text() === "string") throw "a string";
      if (m.text() === "not-array") return "oops" as unknown as Action[];
      return [(undefined as unknown as { x: number }).x as unknown as Action];
    },
  });
  const reason = (text: string) => thrown(() => bot.onMessage(message({ tag: "text", val: text }))).payload;
  assert.equal(reason("bot"), "no name");
  assert.equal(reason("plain"), "plain error");
  assert.equal(reason("limit"), "at least one of buttons is needed");
  assert.equal(reason("string"), "a string");
  assert.equal(reason("not-array"), "a handler must return an array of actions, not string");
  assert.ok(String(reason("type")).startsWith("TypeError: "));
  assert.equal(reasonOf(new LimitError({ kind: "bad-url" })), "file url must start with https:// or http://");
});

test("onTimer gets the timer as scheduled; a bot without one answers nothing", () => {
  const event: TimerEvent = {
    eventId: "timer:t1",
    timerId: "t1",
    conversationId: "conv_1",
    name: "follow-up",
    payload: "A-1042",
    scheduledAt: 1000n,
    dueAt: 61000n,
    state: "bot",
    outsideWindow: true,
  };
  const reminder = defineBot({
    onTimer(t) {
      return [Action.note(`${t.name} ${t.payload} ${t.dueAt - t.scheduledAt} ${t.outsideWindow} ${t.id}`)];
    },
  });
  assert.deepEqual(reminder.onTimer(event), [{ tag: "note", val: "follow-up A-1042 60000 true t1" }]);
  assert.deepEqual(echo.onTimer(event), []);
});

test("onResume gets the hand-back; a bot without one answers nothing", () => {
  const event: ResumeEvent = {
    eventId: "resume:conv_1:1000",
    conversationId: "conv_1",
    cause: "command",
    reason: "release command from Ann (message m7)",
    humanMs: 90000n,
    messages: 3,
    state: "bot",
    outsideWindow: false,
  };
  const back = defineBot({
    onResume(r) {
      return [Action.note(`${r.cause} ${r.humanMs} ${r.messages} ${r.outsideWindow} ${r.eventId}`)];
    },
  });
  assert.deepEqual(back.onResume(event), [{ tag: "note", val: "command 90000 3 false resume:conv_1:1000" }]);
  assert.deepEqual(echo.onResume(event), []);
});

test("a debounced message carries its burst, oldest first", () => {
  const event = message({ tag: "text", val: "third" });
  event.burst = ["first", "second"].map((val, i) => ({ ...event.message, id: `m${i}`, content: { tag: "text", val } }));
  const joined = defineBot({
    onMessage(m) {
      return [Action.text(m.all().map((x) => `${x.id}:${x.text()}`).join(" "))];
    },
  });
  assert.deepEqual(joined.onMessage(event), [{ tag: "text", val: { body: "m0:first m1:second msg_t_0001:third" } }]);
});
