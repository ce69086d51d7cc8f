// The SDK's posts go one at a time, an add-to-cart right after the views still queued: each
// answer sets the shopper's session cookie from what the edge holds then, so two posts in
// flight at once (at two isolates) would leave the cookie of whichever was answered last,
// without the other's events (the next page at a third isolate lost the cart).
// Runs edge-worker/src/sdk.js in a stub page: `node tests/browser/sdk_order.mjs`.
import { readFileSync } from "node:fs";
import vm from "node:vm";
import assert from "node:assert/strict";

const source = readFileSync(new URL("../../edge-worker/src/sdk.js", import.meta.url), "utf8");
const fetches = [];
const beacons = [];
const timers = [];
const listeners = {};
const page = {
  fetch(url, init) {
    let settle;
    const answered = new Promise((resolve, reject) => (settle = { resolve, reject }));
    fetches.push({ url, events: JSON.parse(init.body).events.map((e) => e.type), settle });
    return answered;
  },
  navigator: { sendBeacon: (url, blob) => (beacons.push(blob), true) },
  Blob: class { constructor(parts) { this.text = parts.join(""); } },
  crypto: { randomUUID: () => Math.random().toString(36).slice(2) },
  setTimeout: (f) => (timers.push(f), timers.length),
  clearTimeout: () => {},
  addEventListener: (name, f) => (listeners[name] = f),
  document: {
    querySelector: (s) => (s === "[data-ew-product]" ? { dataset: { ewProduct: "cam-001", ewCategory: "cameras" } } : null),
    addEventListener: () => {},
    getElementById: () => null,
    visibilityState: "visible",
  },
  Promise,
  JSON,
  Date,
  Number,
  String,
  Error,
};
page.window = page;
vm.runInNewContext(source, page);
const ew = page.edgewise;
const settled = () => new Promise((r) => setImmediate(r));

// the views' timer fires: their post goes out
assert.equal(timers.length, 1);
timers[0]();
await settled();
assert.deepEqual(fetches.map((f) => f.events), [["page_view", "product_view"]]);
// add to cart while it is in flight: queued behind it, after the view tracked meanwhile, in a
// request of its own (a refused view must not make a taken add-to-cart look failed)
ew.track("search", { query: "tripod" });
const added = ew.addToCart("cam-001", "cameras", 499);
await settled();
assert.equal(fetches.length, 1, "not sent while the views' post is in flight");
fetches[0].settle.resolve({ ok: true, status: 202 });
await settled();
assert.deepEqual(fetches[1].events, ["search"]);
assert.equal(fetches.length, 2);
fetches[1].settle.resolve({ ok: false, status: 400 });
await settled();
assert.deepEqual(fetches[2].events, ["add_to_cart"]);
fetches[2].settle.resolve({ ok: true, status: 202 });
assert.equal((await added).status, 202);
// a post that fails does not hold the next one
const removed = ew.removeFromCart("cam-001", "cameras");
await settled();
fetches[3].settle.reject(new Error("offline"));
await assert.rejects(removed);
ew.send("purchase", {});
await settled();
assert.deepEqual(fetches[4].events, ["purchase"]);
// the page hidden while that post is in flight: no beacon beside it, the views wait their turn
ew.track("page_view");
listeners.pagehide();
assert.equal(beacons.length, 0);
fetches[4].settle.resolve({ ok: true, status: 202 });
await settled();
assert.deepEqual(fetches[5].events, ["page_view"]);
fetches[5].settle.resolve({ ok: true, status: 202 });
await settled();
// nothing in flight: what is queued leaves in beacons, 100 events each, none left behind
for (let i = 0; i < 150; i++) ew.track("page_view");
listeners.pagehide();
assert.deepEqual(beacons.map((b) => JSON.parse(b.text).events.length), [100, 50]);
assert.equal(fetches.length, 6);
console.log("sdk order: ok");
