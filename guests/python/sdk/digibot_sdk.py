"""digibot_sdk: the Python side of a digibot plugin, over the `wit_world`
bindings componentize-py generates from digishare:bot 0.3.0 (world
`bot-with-timers`). scripts/build-python-plugins puts this module on the
plugin's path.

    import digibot_sdk
    from digibot_sdk import timers

    class WitWorld(digibot_sdk.Bot):
        def on_message(self, event):
            timers.follow_up("follow-up", 600_000, "payload")
            return [digibot_sdk.text("Noted")]

        def on_timer(self, event):
            return [digibot_sdk.text("Still there?")]

`Bot` gives every export of the world a handler that returns no actions:
implement the ones you care about. The twin of the Rust SDK's `timers` and
`conversation` modules (guest-sdk/); see docs/python.md and docs/timers.md.
"""

from dataclasses import dataclass
from typing import List, Optional

import wit_world
from componentize_py_types import Err
from wit_world.imports import conversation as _conversation
from wit_world.imports import kv as _kv
from wit_world.imports import timers as _timers
from wit_world.imports.digishare_bot_types import (
    Action,
    Action_Note,
    Action_Text,
    Message,
    MessageEvent,
    NewConversationEvent,
    ResumeEvent,
    TextReply,
    TimerEvent,
)


class BotError(Exception):
    """A refusal from digibot (`limit: ...`, `quota: ...`, `exists: ...`)."""


class Bot(wit_world.WitWorld):
    """Every export of the world, answering nothing until overridden. A new
    export of the world is one more method here."""

    def on_new_conversation(self, event: NewConversationEvent) -> List[Action]:
        return []

    def on_message(self, event: MessageEvent) -> List[Action]:
        return []

    def on_timer(self, event: TimerEvent) -> List[Action]:
        return []

    def on_resume(self, event: ResumeEvent) -> List[Action]:
        """A human handed the conversation back (`event.cause`,
        `event.human_ms`, `event.messages`)."""
        return []


def all_messages(event: MessageEvent) -> List[Message]:
    """The burst's messages and this one, oldest first: what the customer
    wrote since the bot last answered (just `event.message` without
    `debounce_ms` in the plugin's NAME.toml)."""
    return list(event.burst) + [event.message]


def text(body: str) -> Action:
    """A text reply."""
    return Action_Text(TextReply(body=body, reply_to=None))


def note(body: str) -> Action:
    """An internal note for the agents; the customer never sees it."""
    return Action_Note(body)


class timers:
    """Durable timers in the event's conversation, private to this plugin:
    when one comes due digibot calls `on_timer`. Schedules and cancels take
    effect only if the handler succeeds. Names are 1 to 64 bytes, payloads
    at most 4 KiB, delays at most 30 days, 16 pending per conversation."""

    @staticmethod
    def schedule(
        name: str,
        after_ms: int,
        payload: str = "",
        cancel_on_customer_message: bool = False,
        replace: bool = True,
    ) -> str:
        """Schedules `name` to come due `after_ms` from now with `payload`;
        returns its id. Raises BotError with digibot's reason."""
        if not isinstance(after_ms, int) or after_ms < 0:
            raise BotError(f"limit: a timer's delay is a whole number of ms, not {after_ms!r}")
        options = _timers.ScheduleOptions(
            cancel_on_customer_message=cancel_on_customer_message, replace=replace
        )
        try:
            return _timers.schedule(name, after_ms, payload, options)
        except Err as e:
            raise BotError(str(e.value)) from None

    @staticmethod
    def follow_up(name: str, after_ms: int, payload: str = "") -> str:
        """`schedule`, dropped if the customer writes before it is due."""
        return timers.schedule(name, after_ms, payload, cancel_on_customer_message=True)

    @staticmethod
    def cancel(name: str) -> None:
        """Cancels the pending timer `name`, if any."""
        _timers.cancel(name)


@dataclass(frozen=True)
class HistoryEntry:
    """One message of the conversation."""

    author: str
    """`customer`, `agent`, `bot` or `system`."""
    kind: str
    """`text`, `location`, `button_reply`, ... (`note` for internal notes)."""
    text: Optional[str]
    at: int
    """When digibot received or queued it (ms since the epoch)."""


def history(limit: int) -> List[HistoryEntry]:
    """The conversation's last `limit` messages (at most 50), oldest first:
    the customer's, the agents' and the bot's. The message being handled is
    the last; this turn's replies are not in it yet. 8 calls per event."""
    return [
        HistoryEntry(author=e.author.name.lower(), kind=e.kind, text=e.text, at=e.at)
        for e in _conversation.history(max(0, min(int(limit), 50)))
    ]


class _Scope:
    """One of this plugin's KV scopes; see `kv`."""

    def __init__(self, scope: "_kv.Scope") -> None:
        self._scope = scope

    def get(self, key: str) -> Optional[str]:
        """The value of `key` here, None when absent or expired."""
        try:
            return _kv.get_in(self._scope, key)
        except Err as e:
            raise BotError(e.value) from None

    def set(self, key: str, value: str, ttl_ms: Optional[int] = None) -> None:
        """Stores `value` under `key` here, for `ttl_ms` (1 ms to 365 days)
        or until deleted. Raises BotError on a limit or quota."""
        try:
            _kv.set_in(self._scope, key, value, _kv.SetOptions(ttl_ms=ttl_ms))
        except Err as e:
            raise BotError(e.value) from None

    def delete(self, key: str) -> None:
        """Forgets `key` here."""
        try:
            _kv.delete_in(self._scope, key)
        except Err as e:
            raise BotError(e.value) from None


class kv:
    """State kept in digibot's database, always this plugin's own, written
    when the handler returns (nothing when it raises). `kv.conversation`
    is the event's conversation, `kv.customer` the event's customer across
    their conversations, `kv.plugin` shared by all of this plugin's
    conversations (the last committed write of a key wins). See docs/kv.md.

        digibot_sdk.kv.customer.set("lang", "fr")
        digibot_sdk.kv.conversation.set("otp", "4821", ttl_ms=300_000)
    """

    conversation = _Scope(_kv.Scope.CONVERSATION)
    customer = _Scope(_kv.Scope.CUSTOMER)
    plugin = _Scope(_kv.Scope.PLUGIN)
