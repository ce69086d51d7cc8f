/* Edgewise JS SDK: reports the shopper's events to the edge. Views are batched and sent with
   sendBeacon (they survive navigation); add-to-cart is sent at once with fetch, so the next
   page already reflects it. Usage: edgewise.track(type, fields). */
(function () {
  "use strict";
  var URL = "/v1/events", queue = [], timer = 0;
  function id() {
    return window.crypto && crypto.randomUUID ? crypto.randomUUID()
      : Date.now().toString(36) + "-" + Math.random().toString(36).slice(2);
  }
  function event(type, fields) {
    var e = { event_id: id(), type: type, ts: Date.now() };
    for (var k in fields) e[k] = fields[k];
    return e;
  }
  function post(events) {
    return fetch(URL, {
      method: "POST", credentials: "same-origin", keepalive: true,
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ events: events })
    });
  }
  function flush() {
    clearTimeout(timer); timer = 0;
    if (!queue.length) return;
    var body = JSON.stringify({ events: queue.splice(0, 100) });
    var blob = new Blob([body], { type: "application/json" });
    if (!(navigator.sendBeacon && navigator.sendBeacon(URL, blob))) post(JSON.parse(body).events);
  }
  var ew = window.edgewise = {
    /* Queues an event; sent within a second or when the page is hidden. */
    track: function (type, fields) {
      queue.push(event(type, fields || {}));
      if (!timer) timer = setTimeout(flush, 1000);
    },
    /* Sends an event now; resolves when the edge has applied it. */
    send: function (type, fields) { return post([event(type, fields || {})]); },
    addToCart: function (item, category, price, quantity) {
      return ew.send("add_to_cart", { item: item, category: category, price: price, quantity: quantity || 1 });
    },
    flush: flush
  };
  addEventListener("pagehide", flush);
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") flush();
  });
  ew.track("page_view");
  var product = document.querySelector("[data-ew-product]");
  if (product) ew.track("product_view", { item: product.dataset.ewProduct, category: product.dataset.ewCategory });
  document.addEventListener("click", function (ev) {
    var b = ev.target.closest && ev.target.closest("[data-ew-add]");
    if (!b) return;
    b.disabled = true;
    var status = document.getElementById("ew-status");
    ew.addToCart(b.dataset.ewAdd, b.dataset.ewCategory, Number(b.dataset.ewPrice)).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      var n = document.getElementById("ew-cart-count");
      if (n) n.textContent = String(Number(n.textContent) + 1);
      if (status) status.textContent = "Added to cart";
      b.dataset.state = "added";
    }).catch(function (e) {
      if (status) status.textContent = "Could not add to cart (" + e.message + ")";
    }).then(function () { b.disabled = false; });
  });
})();
