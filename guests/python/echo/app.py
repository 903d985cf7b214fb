"""Echo: answers every customer text message with the same text.

The Python twin of plugins/echo, built against wit/since_v0.1.0 (world
`bot`) by scripts/build-python-plugins. componentize-py generates the
`wit_world` package at build time; this module only implements it.
"""

from typing import List

import wit_world
from wit_world.imports.types import (
    Action,
    Action_Text,
    Content_Text,
    MessageEvent,
    NewConversationEvent,
    TextReply,
)


class WitWorld(wit_world.WitWorld):
    def on_new_conversation(self, event: NewConversationEvent) -> List[Action]:
        return []

    def on_message(self, event: MessageEvent) -> List[Action]:
        content = event.message.content
        if isinstance(content, Content_Text):
            return [Action_Text(TextReply(body=content.value, reply_to=None))]
        return []
