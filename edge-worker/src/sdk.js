/* Edgewise JS SDK: reports the shopper's events to the edge. Views are batched; add-to-cart
   is sent at once, after them, so the next page reflects it. One post at a time: each answer
   sets the session cookie (ARCHITECTURE.md). Usage: edgewise.track(type, fields). */
(function () {
  "use strict";
  var URL = "/v1/events", queue = [], timer = 0, last = Promise.resolve(), busy = 0;
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
    var body = JSON.stringify({ events: events });
    busy++;
    var sent = last.then(function () {
      return fetch(URL, {
        method: "POST", credentials: "same-origin", keepalive: true,
        headers: { "content-type": "application/json" }, body: body
      });
    });
    last = sent.catch(function () {}).then(function () { busy--; });
    return sent;
  }
  /* leaving: a beacon, unless a post is in flight (it would race it) */
  function flush(leaving) {
    clearTimeout(timer); timer = 0;
    while (queue.length) {
      var events = queue.splice(0, 100);
      if (!(leaving === true && !busy && navigator.sendBeacon && navigator.sendBeacon(URL,
        new Blob([JSON.stringify({ events: events })], { type: "application/json" })))) post(events);
    }
  }
  var ew = window.edgewise = {
    /* Queues an event; sent within a second or when the page is hidden. */
    track: function (type, fields) {
      queue.push(event(type, fields || {}));
      if (!timer) timer = setTimeout(flush, 1000);
    },
    /* Sends an event now (after what is queued); resolves once applied. */
    send: function (type, fields) {
      flush();
      return post([event(type, fields || {})]);
    },
    addToCart: function (item, category, price, quantity) {
      return ew.send("add_to_cart", { item: item, category: category, price: price, quantity: quantity || 1 });
    },
    removeFromCart: function (item, category, quantity) {
      return ew.send("remove_from_cart", { item: item, category: category, quantity: quantity || 1 });
    },
    flush: flush
  };
  addEventListener("pagehide", function () { flush(true); });
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") flush(true);
  });
  ew.track("page_view");
  var product = document.querySelector("[data-ew-product]");
  if (product) ew.track("product_view", { item: product.dataset.ewProduct, category: product.dataset.ewCategory });
  function say(text) {
    var status = document.getElementById("ew-status");
    if (status) status.textContent = text;
  }
  document.addEventListener("click", function (ev) {
    var b = ev.target.closest && ev.target.closest("[data-ew-add],[data-ew-remove]");
    if (!b) return;
    b.disabled = true;
    var removing = b.hasAttribute("data-ew-remove");
    var sent = removing
      ? ew.removeFromCart(b.dataset.ewRemove, b.dataset.ewCategory, Number(b.dataset.ewQuantity) || 1)
      : ew.addToCart(b.dataset.ewAdd, b.dataset.ewCategory, Number(b.dataset.ewPrice));
    sent.then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      say(removing ? "Removed from cart" : "Added to cart");
      /* the edge applied the event: a page showing the cart (data-ew-reload, or any remove)
         is shown again as it now is */
      if (removing || b.hasAttribute("data-ew-reload")) return location.reload();
      var n = document.getElementById("ew-cart-count");
      if (n) n.textContent = String(Number(n.textContent) + 1);
      b.dataset.state = "added";
    }).catch(function (e) {
      say("Could not " + (removing ? "remove from" : "add to") + " cart (" + e.message + ")");
    }).then(function () { b.disabled = false; });
  });
})();
