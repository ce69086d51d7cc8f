//! `edge-topology`: the edge as Cloudflare runs it — P locations × I isolates of the real edge
//! `App` over one eventually consistent Workers KV — with shoppers whose requests land on any
//! isolate of their location, in virtual time, deterministic from a seed.
//!
//! It measures what a shopper sees: read-your-writes, monotonic-read and erasure violations,
//! how long their own events and events from other channels take to show, KV and origin
//! operations per page, the tier mix, and the cost per million page views at Cloudflare's list
//! prices. `cargo xtask sim` runs it; `--help` lists the knobs.

mod kv;
mod origin;
mod world;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", world::USAGE);
        return ExitCode::SUCCESS;
    }
    let params = match world::Params::parse(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("edge-topology: {e}\n\n{}", world::USAGE);
            return ExitCode::from(2);
        }
    };
    let out = params.out.clone();
    let designs = if params.both {
        vec![world::Design::Today, world::Design::Session]
    } else {
        vec![params.design]
    };
    let mut all = serde_json::Map::new();
    for design in designs {
        let report = world::run(&world::Params {
            design,
            ..params.clone()
        });
        println!("{}", report.table());
        all.insert(design.name().into(), report.json());
    }
    if let Some(path) = out {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match std::fs::write(&path, serde_json::Value::Object(all).to_string()) {
            Ok(()) => println!("written to {}", path.display()),
            Err(e) => {
                eprintln!("edge-topology: could not write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
