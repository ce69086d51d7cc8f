//! origin-sync: consumes customer events from Kafka, folds them into versioned profiles exactly
//! once, and pushes compressed profile deltas to the edge.
//!
//! This is the skeleton the foundation ships; the service itself is built on top of the pure
//! core in `shared` (fold, deltas, wire format), so that the edge and the origin cannot disagree
//! on what an event means.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") | Some("version") => {
            println!("origin-sync {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        _ => anyhow::bail!(
            "origin-sync is not implemented yet in this build; run `origin-sync --version`"
        ),
    }
}
