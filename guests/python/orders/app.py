"""Orders, in Python: the customer types an order number, the plugin asks
the shop's order API for it (`GET {orders_api}/orders/{number}` with
`Authorization: Bearer {{secret:ORDERS_TOKEN}}`, the token put in by
digibot at send time) and answers its status.

The Python twin of plugins/orders, built against wit/since_v0.3.0 (its
`wit-version` file) by scripts/build-python-plugins. The request goes
through `wasi:http/outgoing-handler`, blocking on its pollables: no event
loop needed for one request per turn. When digibot refuses a request,
`outbound.last_refusal()` says why.
"""

import json
import re
from typing import List, Optional, Tuple

import wit_world
from componentize_py_types import Err, Ok
from wit_world.imports import config, log, outbound, outgoing_handler
from wit_world.imports.digishare_bot_types import (
    Action,
    Action_Text,
    Content_Text,
    MessageEvent,
    NewConversationEvent,
    TextReply,
)
from wit_world.imports.log import Level
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.wasi_http_types import (
    Fields,
    IncomingBody,
    Method_Get,
    OutgoingBody,
    OutgoingRequest,
    Scheme_Http,
    Scheme_Https,
)

ORDER_NUMBER = re.compile(r"#?(?=[A-Za-z0-9-]*[0-9])([A-Za-z0-9-]{3,20})\b")

LABELS = {
    "processing": "en préparation",
    "shipped": "en route",
    "in_transit": "en route",
    "out_for_delivery": "en cours de livraison",
    "delivered": "livrée",
    "cancelled": "annulée",
}

UNAVAILABLE = "Le suivi des commandes est indisponible pour le moment, réessayez plus tard."


class HttpError(Exception):
    """A request digibot refused or that failed."""


def get(url: str, headers: List[Tuple[str, bytes]]) -> Tuple[int, bytes]:
    """GETs `url` and returns (status, body)."""
    scheme, rest = url.split("://", 1)
    authority, _, path = rest.partition("/")
    request = OutgoingRequest(Fields.from_list(headers))
    request.set_method(Method_Get())
    request.set_scheme(Scheme_Https() if scheme == "https" else Scheme_Http())
    request.set_authority(authority)
    request.set_path_with_query("/" + path)
    body = request.body()
    future = outgoing_handler.handle(request, None)
    OutgoingBody.finish(body, None)
    while True:
        result = future.get()
        if result is not None:
            break
        future.subscribe().block()
    if isinstance(result, Err) or isinstance(result.value, Err):
        raise HttpError(refusal())
    response = result.value.value
    status = response.status()
    incoming = response.consume()
    stream = incoming.stream()
    chunks = []
    while True:
        try:
            chunks.append(stream.blocking_read(64 * 1024))
        except Err as e:
            if isinstance(e.value, StreamError_Closed):
                break
            raise HttpError(refusal())
    stream.__exit__(None, None, None)
    IncomingBody.finish(incoming)
    return status, b"".join(chunks)


def refusal() -> str:
    why = outbound.last_refusal()
    return f"{why.kind}: {why.message}" if why else "the request failed"


def status_reply(api: str, number: str) -> str:
    try:
        status, body = get(
            f"{api.rstrip('/')}/orders/{number}",
            [
                ("authorization", b"Bearer {{secret:ORDERS_TOKEN}}"),
                ("accept", b"application/json"),
            ],
        )
    except HttpError as e:
        log.log(Level.WARN, f"order lookup failed: {e}")
        return UNAVAILABLE
    if status == 404:
        return f"Je ne trouve pas la commande {number}. Vérifiez le numéro ?"
    if status != 200:
        log.log(Level.WARN, f"order API answered HTTP {status}")
        return UNAVAILABLE
    try:
        order = json.loads(body)
        label = LABELS.get(order["status"], f"« {order['status']} »")
    except (ValueError, KeyError, TypeError) as e:
        log.log(Level.WARN, f"order API: {e}")
        return UNAVAILABLE
    return f"Votre commande {number} est {label}."


def order_number(text: str) -> Optional[str]:
    match = ORDER_NUMBER.search(text)
    return match.group(1) if match else None


class WitWorld(wit_world.WitWorld):
    def on_new_conversation(self, event: NewConversationEvent) -> List[Action]:
        return []

    def on_message(self, event: MessageEvent) -> List[Action]:
        content = event.message.content
        if not isinstance(content, Content_Text):
            return []
        number = order_number(content.value)
        if number is None:
            return []
        api = config.get("orders_api")
        if api is None:
            log.log(Level.ERROR, "orders_api is not configured")
            return []
        return [Action_Text(TextReply(body=status_reply(api, number), reply_to=None))]
