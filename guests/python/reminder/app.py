"""Reminder: a follow-up after silence. The Python twin of plugins/reminder
(same replies, same timers): every customer text is acknowledged and
schedules a follow-up `after_ms` later (`[config]`, default 10 minutes),
dropped if the customer writes first (the next message schedules a new
one). When it comes due the bot asks whether the customer still needs help
or, outside WhatsApp's 24-hour window, leaves the agents a note instead.

Built against wit/since_v0.3.0, world `bot-with-timers`, with digibot_sdk
(guests/python/sdk) by scripts/build-python-plugins.
"""

import json
from typing import List

import digibot_sdk
from digibot_sdk import note, text, timers
from wit_world.imports import config
from wit_world.imports.digishare_bot_types import Action, Content_Text, MessageEvent, TimerEvent


class WitWorld(digibot_sdk.Bot):
    def on_message(self, event: MessageEvent) -> List[Action]:
        content = event.message.content
        if not isinstance(content, Content_Text):
            return []
        configured = config.get("after_ms")
        after_ms = int(configured) if configured and configured.isdigit() else 600_000
        timers.follow_up("follow-up", after_ms, content.value)
        return [text(f"Noted: {content.value}")]

    def on_timer(self, event: TimerEvent) -> List[Action]:
        # json.dumps quotes as the Rust twin's `{:?}` does for plain text.
        said = json.dumps(event.payload, ensure_ascii=False)
        if event.outside_window:
            return [
                note(
                    f"The customer went quiet after {said}; outside WhatsApp's 24-hour window, so no follow-up was sent."
                )
            ]
        return [text(f"Still there? You wrote {said}; can we help with anything else?")]
