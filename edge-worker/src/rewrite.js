// Proxy mode: fills the placeholders of the site's page as it streams through, with the
// runtime's own HTMLRewriter (lol-html in workerd: no parser in the worker's bundle).
// `render(slot, k, item)` is Rust (`PagePersonalization::render`); it returns the block's HTML,
// or undefined to leave the site's own content. The SDK's script tag is added before </body>
// unless the page already loads it. `done` settles when the page has streamed through (or
// failed), so the worker keeps `render` alive exactly as long as the page needs it.
export function personalize(response, render, sdkSrc) {
  let settle;
  const done = new Promise((resolve) => {
    settle = resolve;
  });
  let sdkSeen = false;
  const rewriter = new HTMLRewriter()
    .on("[data-edgewise-slot]", {
      element(el) {
        try {
          const html = render(
            el.getAttribute("data-edgewise-slot") ?? "",
            el.getAttribute("data-k") ?? "",
            el.getAttribute("data-item") ?? "",
          );
          if (typeof html === "string") {
            el.setInnerContent(html, { html: true });
            el.setAttribute("data-edgewise-filled", "");
          }
        } catch (e) {
          // never worse than no Edgewise: the site's own content stays
          console.error(`edgewise: a placeholder was left as the site wrote it: ${e}`);
        }
      },
    })
    .on(`script[src="${sdkSrc}"]`, {
      element() {
        sdkSeen = true;
      },
    })
    .on("body", {
      element(el) {
        el.onEndTag((end) => {
          if (!sdkSeen) {
            sdkSeen = true;
            end.before(`<script src="${sdkSrc}" defer></script>`, { html: true });
          }
        });
      },
    })
    .onDocument({
      end() {
        settle();
      },
    });
  const out = rewriter.transform(response);
  // a page that fails or is abandoned mid-stream never reaches its end: settle anyway
  setTimeout(() => settle(), 60000);
  return { response: out, done };
}
