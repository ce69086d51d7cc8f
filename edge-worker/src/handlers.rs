//! Request handlers, independent of the Workers runtime.

use serde_json::json;

/// A response in runtime-neutral form: the glue turns it into a `worker::Response`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, value: &serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    pub fn error(status: u16, message: &str) -> Reply {
        Reply::json(status, &json!({ "error": message }))
    }
}

/// Routes a request by method and path.
pub fn route(method: &str, path: &str) -> Reply {
    match (method, path) {
        ("GET", "/healthz") => Reply::json(
            200,
            &json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }),
        ),
        _ => Reply::error(404, "no such route"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_and_unknown_routes() {
        assert_eq!(route("GET", "/healthz").status, 200);
        let r = route("GET", "/nope");
        assert_eq!(r.status, 404);
        assert_eq!(r.body, br#"{"error":"no such route"}"#);
    }
}
