// Reminder: a follow-up after silence. The TypeScript twin of
// plugins/reminder (same replies, same timers): every customer text is
// acknowledged and schedules a follow-up `after_ms` later (`[config]`,
// default 10 minutes), dropped if the customer writes first (the next
// message schedules a new one). When it comes due the bot asks whether the
// customer still needs help or, outside WhatsApp's 24-hour window, leaves
// the agents a note instead.
import { Action, config, defineBot, timers } from "digibot-sdk";

export const { onNewConversation, onMessage, onTimer } = defineBot({
  onMessage(message) {
    const text = message.text();
    if (text === undefined) return [];
    const configured = config.get("after_ms");
    const afterMs = configured !== undefined && /^\d+$/.test(configured) ? Number(configured) : 600_000;
    timers.followUp("follow-up", afterMs, text);
    return [Action.text(`Noted: ${text}`)];
  },

  onTimer(timer) {
    // JSON.stringify quotes as the Rust twin's `{:?}` does for plain text.
    const said = JSON.stringify(timer.payload);
    if (timer.outsideWindow) {
      return [
        Action.note(
          `The customer went quiet after ${said}; outside WhatsApp's 24-hour window, so no follow-up was sent.`,
        ),
      ];
    }
    return [Action.text(`Still there? You wrote ${said}; can we help with anything else?`)];
  },
});
