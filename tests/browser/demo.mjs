// The demo store through Edgewise, tried as a shopper would, in headless Chromium: an
// anonymous visitor's camera page shows what goes with a camera (with pictures), "Add to cart"
// is announced (aria-live) and counted in the header, "Popular now" leaves out what is in the
// cart, and the cart page shows quantities that the shopper changes and removes.
// Usage: node tests/browser/demo.mjs STORE_URL   (CHROMIUM_PATH names the browser)
import { chromium } from "playwright-core";

const [store] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
const fail = (why) => {
  throw new Error(why);
};
const skus = (page, sel) => page.$$eval(`${sel} [data-sku]`, (els) => els.map((e) => e.dataset.sku));
const cartCount = async (page) => (await page.textContent("#ew-cart-count"))?.trim();
try {
  const page = await (await browser.newContext()).newPage();
  const seen = {};

  // 1. a camera's page, as a visitor the edge knows nothing about
  await page.goto(`${store}/p/cam-001`);
  const goes = await skus(page, "#ew-recs");
  if (goes.length === 0) fail("the camera page's 'Goes well with' is empty");
  const notAccessory = goes.filter((s) => !/^(lens|sd|tri|bag|kit-cam)-/.test(s));
  if (notAccessory.length) fail(`'Goes well with' a camera shows ${notAccessory} (all: ${goes})`);
  seen.goes_well_with = goes;
  const picture = await page.$eval("article img", (img) => img.complete && img.naturalWidth > 0);
  if (!picture) fail("the product's picture did not load");
  const icon = await page.evaluate(async () => (await fetch("/favicon.svg")).status);
  if (icon !== 200) fail(`favicon answered ${icon}`);
  const live = await page.getAttribute("#ew-status", "aria-live");
  if (live !== "polite") fail(`the status region is not announced (aria-live=${live})`);

  // 2. add it to the cart, twice
  for (const n of ["1", "2"]) {
    await Promise.all([
      page.waitForResponse((r) => r.url().endsWith("/v1/events") && r.request().postData()?.includes("add_to_cart")),
      page.click("#ew-add"),
    ]);
    await page.waitForFunction((n) => document.getElementById("ew-cart-count")?.textContent?.trim() === n, n);
  }
  const said = (await page.textContent("#ew-status"))?.trim();
  if (said !== "Added to cart") fail(`the status says ${JSON.stringify(said)}`);

  // 3. the home page: accessories for the cart, and "Popular now" without the camera
  await page.goto(`${store}/`);
  if ((await cartCount(page)) !== "2") fail(`home page cart count ${await cartCount(page)}`);
  const popular = await skus(page, "#ew-popular");
  if (popular.length === 0) fail("'Popular now' is empty");
  if (popular.includes("cam-001")) fail(`'Popular now' shows the camera in the cart: ${popular}`);
  seen.popular_now = popular.length;
  const recs = await page.$$eval("#ew-recs [data-reason]", (els) => els.map((e) => e.dataset.reason));
  if (!recs.includes("cart_accessory")) fail(`no cart accessories on the home page: ${recs}`);

  // 4. the cart page: quantity 2, one fewer, then remove
  await page.goto(`${store}/cart`);
  const qty = async () => (await page.textContent('#ew-cart tr[data-sku="cam-001"] .ew-qty'))?.trim();
  if ((await qty()) !== "2") fail(`the cart page shows quantity ${await qty()}`);
  seen.total_before = (await page.textContent(".ew-total"))?.trim();
  await Promise.all([page.waitForNavigation(), page.click('button[aria-label^="One fewer"]')]);
  if ((await qty()) !== "1") fail(`after one fewer the cart page shows quantity ${await qty()}`);
  if ((await cartCount(page)) !== "1") fail(`after one fewer the header says ${await cartCount(page)}`);
  await Promise.all([page.waitForNavigation(), page.click('button[aria-label^="Remove"]')]);
  const empty = (await page.textContent("#ew-cart"))?.trim();
  if (empty !== "Your cart is empty.") fail(`after remove the cart page says ${JSON.stringify(empty)}`);
  if ((await cartCount(page)) !== "0") fail(`after remove the header says ${await cartCount(page)}`);
  seen.cart = "2 → 1 → empty";
  console.log(JSON.stringify(seen));
} finally {
  await browser.close();
}
