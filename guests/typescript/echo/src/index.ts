// Echo: answers every customer text message with the same text.
//
// The TypeScript twin of plugins/echo. Like the Rust one, a text that breaks
// Digishare's limits (empty, over 4096 characters) is the event's error,
// and anything that is not text gets no reply.
import { Action, defineBot } from "digibot-sdk";

export const { onNewConversation, onMessage } = defineBot({
  onMessage(message) {
    const text = message.text();
    return text === undefined ? [] : [Action.text(text)];
  },
});
