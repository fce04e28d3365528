// A server-side shop visit sent by the official Node.js tracker (@snowplow/node-tracker), unchanged:
// a shop's backend tracking what its pages cannot see. Prints how many events it tracked.
// node node_tracker.mjs ENDPOINT get|post BUFFER_SIZE APP_ID SESSION_ID DOMAIN_USER_ID USER_ID
import {
  buildAddToCart, buildEcommerceTransaction, buildEcommerceTransactionItem, buildPageView, buildSelfDescribingEvent,
  buildStructEvent, newTracker,
} from "@snowplow/node-tracker";

const [endpoint, method, bufferSize, appId, sessionId, domainUserId, userId] = process.argv.slice(2);
const failures = [];
const tracker = newTracker({ namespace: "backend", appId }, {
  endpoint, eventMethod: method, bufferSize: Number(bufferSize), retryFailedRequests: false,
  onRequestFailure: (failure) => failures.push(failure),
});
tracker.setSessionId(sessionId);
tracker.setSessionIndex(3);
tracker.setDomainUserId(domainUserId);
tracker.setUserId(userId);
tracker.setIpAddress("192.0.2.77");
tracker.setUseragent("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36");
tracker.setTimezone("Europe/Berlin");

const pageType = { schema: "iglu:com.clickshop/page_type/jsonschema/1-0-0", data: { type: "product", category: "shoes" } };
const events = [
  [buildPageView({ pageUrl: "https://shop.test/p/sku-1", pageTitle: "Red shoes" }), [pageType]],
  [buildSelfDescribingEvent({ event: { schema: "iglu:com.clickshop/product_view/jsonschema/1-0-0",
    data: { sku: "sku-1", category: "shoes", price: 59.9, currency: "EUR" } } })],
  [buildAddToCart({ sku: "sku-1", quantity: 2, name: "Red shoes", category: "shoes", unitPrice: 59.9, currency: "EUR" })],
  [buildStructEvent({ category: "checkout", action: "coupon", label: "WELCOME10", value: 10 })],
  [buildEcommerceTransaction({ orderId: "order-7", total: 107.82, currency: "EUR" })],
  [buildEcommerceTransactionItem({ orderId: "order-7", sku: "sku-1", name: "Red shoes", price: 59.9, quantity: 2,
    currency: "EUR" })],
];
for (const [event, context] of events) {
  tracker.track(event, context);
}
await tracker.flush();
if (failures.length) {
  console.error(`${failures.length} requests failed: ${JSON.stringify(failures.map((f) => f.status ?? f.message))}`);
  process.exit(1);
}
console.log(events.length);
