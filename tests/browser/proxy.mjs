// Proxy mode in headless Chromium: the retailer's own pages through Edgewise. Open the site's
// camera page, add it to the cart with the site's button (the SDK Edgewise injected posts the
// event), open the site's home page: its placeholder must hold camera accessories, and no
// placeholder on either page may be left unfilled.
// Usage: node tests/browser/proxy.mjs EDGE_URL   (CHROMIUM_PATH names the browser binary)
import { chromium } from "playwright-core";

const base = process.argv[2];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
const unfilled = (page) => page.$$eval("[data-edgewise-slot]:not([data-edgewise-filled])", (els) => els.length);
try {
  const page = await browser.newPage();
  await page.goto(`${base}/p/cam-001`);
  if ((await unfilled(page)) !== 0) throw new Error("a placeholder on the product page was left unfilled");
  const goesWith = await page.$$eval("[data-edgewise-slot] [data-sku]", (els) => els.map((e) => e.dataset.sku));
  if (goesWith.length === 0 || goesWith.includes("cam-001")) throw new Error(`goes well with: ${goesWith}`);
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith("/v1/events") && r.request().postData()?.includes("add_to_cart")),
    page.click("#ew-add"),
  ]);
  if (response.status() !== 202) throw new Error(`add to cart answered ${response.status()}`);
  await page.goto(`${base}/`);
  if ((await unfilled(page)) !== 0) throw new Error("a placeholder on the home page was left unfilled");
  const items = await page.$$eval("[data-edgewise-slot] [data-sku]", (els) => els.map((e) => ({ sku: e.dataset.sku, reason: e.dataset.reason })));
  const tier = await page.getAttribute("[data-edgewise-slot] .ew-block", "data-tier");
  console.log(JSON.stringify({ tier, goes_with: goesWith, items }));
  if (!items.some((i) => i.reason === "cart_accessory")) throw new Error("the home placeholder shows no camera accessories");
} finally {
  await browser.close();
}
