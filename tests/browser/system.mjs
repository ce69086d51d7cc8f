// The seed workflow through the whole stack, in headless Chromium. Context A shops at edge A:
// it opens a camera's product page and adds it to the cart with the page's own button (the SDK
// posts the event; edge A forwards it to origin's /ingest → Kafka → origin-sync). Context B is
// the same shopper (same visitor cookie) at edge B, another location whose cache and KV have
// never seen them, so only origin-sync's delta can personalize it. We print how long after the
// click edge B had the shopper's profile (event → edge freshness, seen by B's own requests), then
// B's home page must show camera accessories or the camera offer, and A's next page the cart.
// Usage: node tests/browser/system.mjs EDGE_A_URL EDGE_B_URL   (CHROMIUM_PATH names the browser)
import { chromium } from "playwright-core";

const [edgeA, edgeB] = process.argv.slice(2);
const timeoutMs = 20000;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const a = await browser.newContext();
  const pageA = await a.newPage();
  await pageA.goto(`${edgeA}/p/cam-001`);
  const vid = (await a.cookies()).find((c) => c.name === "ew_vid");
  if (!vid) throw new Error("edge A set no visitor cookie");
  // cookies are per host, not per port: B presents the same visitor id to edge B
  const b = await browser.newContext();
  await b.addCookies([{ name: "ew_vid", value: vid.value, domain: "127.0.0.1", path: "/" }]);
  const pageB = await b.newPage();
  await pageB.goto(`${edgeB}/healthz`); // B's page polls from edge B's origin, connection warm

  const [response] = await Promise.all([
    pageA.waitForResponse((r) => r.url().endsWith("/v1/events") && r.request().postData()?.includes("add_to_cart")),
    pageA.click("#ew-add"),
  ]);
  if (response.status() !== 202) throw new Error(`add to cart answered ${response.status()}`);
  const clicked = Date.now();
  // Freshness: poll edge B's view of this shopper (same cookie jar) until origin's profile,
  // with the cart line, is there. Then load the home page as the shopper would.
  let freshness = null;
  let polls = 0;
  while (Date.now() - clicked < timeoutMs) {
    const me = await pageB.evaluate(async () => (await fetch("/v1/me", { cache: "no-store" })).json());
    polls += 1;
    if (me.profile_version >= 1 && me.profile?.cart?.length > 0) {
      freshness = Date.now() - clicked;
      break;
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  if (freshness === null) throw new Error(`edge B never received the shopper's profile within ${timeoutMs} ms`);
  let seen = null;
  await pageB.goto(`${edgeB}/`);
  const offer = await pageB.$eval("#ew-recs", (s) => s.querySelector("[data-offer-id]")?.dataset.offerId ?? null);
  const items = await pageB.$$eval("#ew-recs [data-sku]", (els) => els.map((e) => ({ sku: e.dataset.sku, reason: e.dataset.reason })));
  const accessories = items.filter((i) => i.reason === "cart_accessory" || i.sku === "kit-cam-starter");
  if (offer === "cam-accessories-10" || accessories.length > 0) {
    seen = {
      freshness_ms: freshness,
      polls,
      // the storefront's block carries the tier itself; a proxied site's placeholder holds it
      tier: await pageB.$eval("#ew-recs", (s) => s.dataset.tier ?? s.querySelector("[data-tier]")?.dataset.tier ?? null),
      offer,
      accessories: accessories.map((i) => i.sku),
      cart: await pageB.textContent("#ew-cart-count"),
    };
  }
  if (!seen) throw new Error(`edge B has the profile but its home page shows no camera accessories or offer: ${JSON.stringify(items)}`);
  // A's next page: when edge A is several isolates behind a router, it lands on one that did
  // not take the add to cart, and the shopper's session cookie brings the cart along
  await pageA.goto(`${edgeA}/`);
  const cartA = (await pageA.textContent("#ew-cart-count"))?.trim();
  if (cartA !== "1") {
    // what the next isolate had to go on: the cookies it was sent, and its view of the shopper
    const jar = (await a.cookies()).map((c) => `${c.name} (${c.value.length} B)`);
    const me = await pageA.evaluate(async () => (await fetch("/v1/me", { cache: "no-store" })).text());
    throw new Error(`edge A's next page shows cart count ${cartA}, expected 1; cookies: ${jar.join(", ")}; /v1/me now: ${me}`);
  }
  seen.cart_at_a_next_page = cartA;
  console.log(JSON.stringify({ vid: vid.value, ...seen }));
} finally {
  await browser.close();
}
