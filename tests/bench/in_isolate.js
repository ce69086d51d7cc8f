// The edge worker's own fetch handler run many times inside one isolate, with no HTTP server,
// socket or client in between (`edge-load --in-isolate`): the worker's cost per answer on
// workerd, glue and wasm, of a route beside another's.
//
//   POST /__loop/shoppers  a JSON array of header objects; the runs take them in turns
//   GET  /__loop/run?path=P&n=N  N requests for P through the worker's handler, one after
//                        the other, each body read; answers a JSON count of statuses (and
//                        of answers that set a cookie, `set_cookie`)
//
// Anything else goes to the worker as it is (seeding, warming up, /healthz).
import Edge from "./index.js";

let shoppers = [{}];

export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    if (url.pathname === "/__loop/shoppers") {
      shoppers = await request.json();
      return new Response(`${shoppers.length} shoppers\n`);
    }
    const edge = new Edge(ctx, env);
    if (url.pathname !== "/__loop/run") return edge.fetch(request);
    const n = Number(url.searchParams.get("n") ?? "1000");
    const target = new URL(url.searchParams.get("path") ?? "/", url);
    const statuses = {};
    for (let i = 0; i < n; i++) {
      // a Request made here has no Host header unless given one, as every request from a
      // browser has (the edge names its cookies by it)
      const headers = { host: url.host, ...shoppers[i % shoppers.length] };
      const res = await edge.fetch(new Request(target, { headers }));
      await res.arrayBuffer();
      statuses[res.status] = (statuses[res.status] ?? 0) + 1;
      if (res.headers.has("set-cookie")) statuses.set_cookie = (statuses.set_cookie ?? 0) + 1;
    }
    return Response.json(statuses);
  },
};
