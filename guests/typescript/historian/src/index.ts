// Historian: answers every customer text with the conversation's last five
// messages, oldest first, as `history()` returns them (`author/kind: text`,
// joined with ` | `). The TypeScript twin of plugins/historian.
import { Action, defineBot, history } from "digibot-sdk";

export const { onNewConversation, onMessage } = defineBot({
  onMessage(message) {
    if (message.text() === undefined) return [];
    const lines = history(5).map((m) => `${m.author}/${m.kind}: ${m.text ?? ""}`);
    return [Action.text(lines.join(" | "))];
  },
});
