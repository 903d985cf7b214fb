// Orders, in TypeScript: the customer types an order number, the plugin
// asks the shop's order API for it with fetch() (`GET
// {orders_api}/orders/{number}`, `Authorization: Bearer
// {{secret:ORDERS_TOKEN}}`: digibot puts the token in at send time, the
// plugin never sees it) and answers its status.
//
// The twin of plugins/orders and guests/python/orders: same replies, same
// requests. The request goes through wasi:http/outgoing-handler, inside
// NAME.toml's `[grants] http`; when digibot refuses it, fetch rejects and
// `outbound.lastRefusal()` says why.
import { Action, config, defineBot, log, outbound } from "digibot-sdk";

const ORDER_NUMBER = /#?(?=[A-Za-z0-9-]*[0-9])([A-Za-z0-9-]{3,20})\b/;

const LABELS: Record<string, string> = {
  processing: "en préparation",
  shipped: "en route",
  in_transit: "en route",
  out_for_delivery: "en cours de livraison",
  delivered: "livrée",
  cancelled: "annulée",
};

const UNAVAILABLE = "Le suivi des commandes est indisponible pour le moment, réessayez plus tard.";

async function statusReply(api: string, number: string): Promise<string> {
  let response: Response;
  try {
    response = await fetch(`${api.replace(/\/+$/, "")}/orders/${number}`, {
      headers: {
        authorization: "Bearer {{secret:ORDERS_TOKEN}}",
        accept: "application/json",
      },
    });
  } catch (e) {
    const why = outbound.lastRefusal();
    log.warn(`order lookup failed: ${why ? `${why.kind}: ${why.message}` : String(e)}`);
    return UNAVAILABLE;
  }
  if (response.status === 404) return `Je ne trouve pas la commande ${number}. Vérifiez le numéro ?`;
  if (response.status !== 200) {
    log.warn(`order API answered HTTP ${response.status}`);
    return UNAVAILABLE;
  }
  try {
    const order = (await response.json()) as { status?: unknown };
    if (typeof order.status !== "string") throw new Error("no status");
    return `Votre commande ${number} est ${LABELS[order.status] ?? `« ${order.status} »`}.`;
  } catch (e) {
    log.warn(`order API: ${String(e)}`);
    return UNAVAILABLE;
  }
}

export const { onNewConversation, onMessage } = defineBot({
  async onMessage(message) {
    const number = ORDER_NUMBER.exec(message.text() ?? "")?.[1];
    if (number === undefined) return [];
    const api = config.get("orders_api");
    if (api === undefined) {
      log.error("orders_api is not configured");
      return [];
    }
    return [Action.text(await statusReply(api, number))];
  },
});
