// The seed workflow in headless Chromium against the edge alone: open a camera's product page,
// add it to the cart with the page's own button (the SDK posts the event), open the home page,
// and expect camera accessories or the camera offer in the recommendations block.
// Usage: node tests/browser/seed.mjs BASE_URL   (CHROMIUM_PATH names the browser binary)
import { chromium } from "playwright-core";

const base = process.argv[2];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const page = await browser.newPage();
  await page.goto(`${base}/p/cam-001`);
  const before = await page.getAttribute("#ew-recs", "data-tier");
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith("/v1/events") && r.request().postData()?.includes("add_to_cart")),
    page.click("#ew-add"),
  ]);
  if (response.status() !== 202) throw new Error(`add to cart answered ${response.status()}`);
  await page.waitForSelector("#ew-status:has-text('Added to cart')");
  const t0 = Date.now();
  await page.goto(`${base}/`);
  const ms = Date.now() - t0;
  const tier = await page.getAttribute("#ew-recs", "data-tier");
  const offer = await page.$eval("#ew-recs", (s) => s.querySelector("[data-offer-id]")?.dataset.offerId ?? null);
  const items = await page.$$eval("#ew-recs [data-sku]", (els) => els.map((e) => ({ sku: e.dataset.sku, reason: e.dataset.reason })));
  const cart = await page.textContent("#ew-cart-count");
  console.log(JSON.stringify({ before, tier, offer, cart, home_load_ms: ms, items }));
  const accessories = items.filter((i) => i.reason === "cart_accessory" || i.sku === "kit-cam-starter");
  if (offer !== "cam-accessories-10" && accessories.length === 0) {
    throw new Error("the home page shows neither camera accessories nor the camera offer");
  }
  if (cart !== "1") throw new Error(`cart count is ${cart}, expected 1`);
} finally {
  await browser.close();
}
