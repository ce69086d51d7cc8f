// A request's head and an answer's head cross between JS and the wasm as one text each, instead
// of one call per header through workers-rs (two JS strings per header each way, each call a
// crossing): on standalone workerd that was a tenth of a personalized answer's CPU time. Lines
// are separated by "\n", which no header name or value may contain (the Fetch standard forbids
// it; the runtime refuses it).

// "METHOD\nURL\nname\nvalue\n..." (names lower-case, as the runtime's Headers give them).
export function requestHead(request) {
  let head = request.method + "\n" + request.url;
  for (const [name, value] of request.headers) {
    head += "\n" + name + "\n" + value;
  }
  return head;
}

// The answer: `head` is "name\nvalue\n..."; set-cookie may repeat, any other name is set once
// (the last one wins). `body` is a view of the wasm's memory, so it is copied before the
// memory can change; an empty body is none (204 and 304 may not have one).
export function respond(status, body, head) {
  const headers = new Headers();
  const parts = head.split("\n");
  for (let i = 0; i + 1 < parts.length; i += 2) {
    if (parts[i].toLowerCase() === "set-cookie") {
      headers.append(parts[i], parts[i + 1]);
    } else {
      headers.set(parts[i], parts[i + 1]);
    }
  }
  return new Response(body.length === 0 ? null : body.slice(), { status, headers });
}
