// Times the recommender inside wasm, call by call, under Node's V8 (the engine Workers run).
// Usage: node bench.mjs MODULE.wasm [ITEMS] [RULES] [CALLS]  — prints the figures as JSON.
import { readFileSync } from "node:fs";

const [path, items = "10000", rules = "500", calls = "20000"] = process.argv.slice(2);
const { instance } = await WebAssembly.instantiate(readFileSync(path), {});
const { setup, recommend, decode } = instance.exports;
const t0 = process.hrtime.bigint();
if (setup(Number(items), Number(rules)) !== 0) {
  console.error("setup failed: the synthetic catalog or rules did not compile");
  process.exit(1);
}
const setupMs = Number(process.hrtime.bigint() - t0) / 1e6;
// warm up: V8 tiers the module up (Liftoff, then TurboFan) as it runs
for (let i = 0; i < 2000; i++) recommend(i);
const n = Number(calls);
const us = new Float64Array(n);
let empty = 0;
for (let i = 0; i < n; i++) {
  const a = process.hrtime.bigint();
  const got = recommend(i);
  us[i] = Number(process.hrtime.bigint() - a) / 1e3;
  if (got === 0 || got === 0xffffffff) empty++;
}
// the cost of the timing itself: an empty call pair
const floor = new Float64Array(n);
for (let i = 0; i < n; i++) {
  const a = process.hrtime.bigint();
  floor[i] = Number(process.hrtime.bigint() - a) / 1e3;
}
// decoding the catalog's image, as a new isolate does (a few runs: each allocates it all)
const decodeMs = [];
for (let i = 0; i < 7; i++) {
  const a = process.hrtime.bigint();
  if (decode() !== Number(items)) {
    console.error("decoding the catalog image failed");
    process.exit(1);
  }
  decodeMs.push(Number(process.hrtime.bigint() - a) / 1e6);
}
const pct = (xs, p) => {
  const s = Float64Array.from(xs).sort();
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};
// per shopper (call i answers shopper i % 64): is the tail a few costly shoppers, or every
// shopper's occasional slow call (a GC, a tier-up)?
const perShopper = Array.from({ length: 64 }, (_, s) => us.filter((_, i) => i % 64 === s));
const shopperP50 = perShopper.map((xs) => pct(xs, 50));
const slowest = shopperP50.map((p50, s) => ({ s, p50 })).sort((x, y) => y.p50 - x.p50)[0];
console.log(JSON.stringify({
  slowest_shopper: slowest.s, slowest_shopper_p50_us: slowest.p50,
  shoppers_p50_above_100_us: shopperP50.filter((p) => p > 100).length,
  median_shopper_p99_us: pct(perShopper.map((xs) => pct(xs, 99)), 50),
  items: Number(items), rules: Number(rules), calls: n, setup_ms: setupMs,
  p50_us: pct(us, 50), p90_us: pct(us, 90), p99_us: pct(us, 99), max_us: pct(us, 100),
  timer_p50_us: pct(floor, 50), empty_answers: empty, node: process.version,
  decode_ms_first: decodeMs[0], decode_ms_p50: pct(decodeMs, 50),
}));
