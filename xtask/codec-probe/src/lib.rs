//! One exported function that decodes with the codec chosen by feature (none, `lz4`,
//! `deflate`). Built for wasm32 once per feature, the size differences are what each codec's
//! decoder costs the edge bundle; the edge only ever decodes, so only decoders are probed.
#![allow(unsafe_code)] // exporting a symbol needs #[unsafe(no_mangle)]

#[unsafe(no_mangle)]
pub extern "C" fn probe(len: usize) -> usize {
    let input = std::hint::black_box(vec![0u8; len]);
    decode(&input)
}

#[cfg(feature = "lz4")]
fn decode(input: &[u8]) -> usize {
    let mut out = vec![0u8; 1 << 16];
    lz4_flex::block::decompress_into(input, &mut out).unwrap_or(0)
}

#[cfg(feature = "deflate")]
fn decode(input: &[u8]) -> usize {
    miniz_oxide::inflate::decompress_to_vec_with_limit(input, 1 << 16).map_or(0, |v| v.len())
}

/// Fills every placeholder of a page as proxy mode does, streaming.
#[cfg(feature = "lol_html")]
fn decode(input: &[u8]) -> usize {
    use lol_html::html_content::ContentType;
    use lol_html::{HtmlRewriter, Settings, element};
    let mut out = Vec::new();
    let mut rewriter = HtmlRewriter::new(
        Settings {
            element_content_handlers: vec![element!("[data-edgewise-slot]", |el| {
                let slot = el.get_attribute("data-edgewise-slot").unwrap_or_default();
                el.set_inner_content(&slot, ContentType::Html);
                Ok(())
            })],
            ..Settings::new()
        },
        |c: &[u8]| out.extend_from_slice(c),
    );
    let _ = rewriter.write(input);
    let _ = rewriter.end();
    out.len()
}

#[cfg(not(any(feature = "lz4", feature = "deflate", feature = "lol_html")))]
fn decode(input: &[u8]) -> usize {
    input.iter().map(|b| usize::from(*b)).sum()
}
