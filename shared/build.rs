//! Converts the bundled demo catalog and rules to their JSON form, so builds without the `toml`
//! feature (the edge worker) can still load them.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in ["catalog", "rules"] {
        let src = format!("data/{name}.toml");
        println!("cargo::rerun-if-changed={src}");
        let text = std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("{src}: {e}"));
        let value: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{src}: {e}"));
        let json = serde_json::to_string(&value).unwrap_or_else(|e| panic!("{src}: {e}"));
        std::fs::write(out.join(format!("{name}.json")), json).expect("OUT_DIR is writable");
    }
}
