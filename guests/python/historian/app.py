"""Historian: answers every customer text with the conversation's last five
messages, oldest first, as `digibot_sdk.history` returns them
(`author/kind: text`, joined with ` | `). The Python twin of
plugins/historian, built against wit/since_v0.3.0 with digibot_sdk.
"""

from typing import List

import digibot_sdk
from digibot_sdk import history, text
from wit_world.imports.digishare_bot_types import Action, Content_Text, MessageEvent


class WitWorld(digibot_sdk.Bot):
    def on_message(self, event: MessageEvent) -> List[Action]:
        if not isinstance(event.message.content, Content_Text):
            return []
        lines = [f"{m.author}/{m.kind}: {m.text or ''}" for m in history(5)]
        return [text(" | ".join(lines))]
