//! The only code that touches workers-rs: it converts the request, calls the handlers and
//! converts their reply. Keep it this thin.

use crate::handlers::{Reply, route};
use worker::{Context, Env, Request, Response, Result, event};

#[event(fetch)]
async fn fetch(req: Request, _env: Env, _ctx: Context) -> Result<Response> {
    let url = req.url()?;
    let reply = route(req.method().as_ref(), url.path());
    into_response(reply)
}

fn into_response(reply: Reply) -> Result<Response> {
    let mut resp = Response::from_bytes(reply.body)?.with_status(reply.status);
    let headers = resp.headers_mut();
    headers.set("content-type", reply.content_type)?;
    for (k, v) in reply.headers {
        headers.set(k, &v)?;
    }
    Ok(resp)
}
