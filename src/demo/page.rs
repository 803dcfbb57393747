//! The demo's page: a chat in the browser, connected through the edge with its token as a
//! subprotocol entry, resuming after a drop.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub(super) async fn serve(listener: TcpListener, url: String, token: String) {
    let page = Bytes::from(PAGE.replace("{{URL}}", &url).replace("{{TOKEN}}", &token));
    while let Ok((stream, _)) = listener.accept().await {
        let page = page.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let page = page.clone();
                async move {
                    let mut response = Response::new(Full::new(Bytes::new()));
                    if request.uri().path() == "/" {
                        *response.body_mut() = Full::new(page);
                        response.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("text/html; charset=utf-8"),
                        );
                    } else {
                        *response.status_mut() = StatusCode::NOT_FOUND;
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<meta charset="utf-8">
<title>wsedge demo</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: .75rem; min-height: 12rem; white-space: pre-wrap; }
  .who { color: #666; font-size: .9em; }
  form { display: flex; gap: .5rem; margin-top: .75rem; }
  input { flex: 1; padding: .4rem; }
</style>
<h1>wsedge demo</h1>
<p class="who" id="status">connecting…</p>
<div id="log"></div>
<form id="form"><input id="text" value="hello" autocomplete="off"><button>Send</button></form>
<script>
  // A browser cannot set Authorization on a WebSocket: the token travels as a subprotocol
  // entry, which wsedge takes out before the request reaches the chat core.
  const token = "{{TOKEN}}";
  // Resume: name the session, count what arrives, and come back for the rest after a drop.
  const session = self.crypto && crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
  let seq = 0;
  let ws;
  const log = document.getElementById("log");
  const status = document.getElementById("status");
  function connect(resume) {
    let url = "{{URL}}?conversation_id=browser-demo&session_id=" + session;
    if (resume) url += "&last_seq=" + seq;
    ws = new WebSocket(url, ["bearer." + token]);
    ws.onopen = () => { status.textContent = resume ? "resumed: nothing missed" : "connected through wsedge"; };
    ws.onclose = (e) => {
      status.textContent = "closed: " + e.code + " " + e.reason;
      // 1006: the connection dropped (network change, sleep). 4001: the token expired; a real
      // page fetches a fresh one first. 4002 would mean the session is gone: start over.
      if (e.code === 1006 || e.code === 4001) {
        status.textContent += " - resuming…";
        setTimeout(() => connect(true), 1000);
      }
    };
    ws.onmessage = (e) => {
      seq += 1;
      const event = JSON.parse(e.data);
      if (event.type === "hello") {
        const id = event.identity;
        status.textContent = "the chat core sees user " + id.user + ", tenant " + id.tenant + ", conversation " + id.conversation;
      } else if (event.type === "token") {
        log.textContent += event.text;
      } else if (event.type === "done") {
        log.textContent += "\n\n";
      }
    };
  }
  connect(false);
  document.getElementById("form").onsubmit = (e) => {
    e.preventDefault();
    const text = document.getElementById("text").value;
    log.textContent += "> " + text + "\n";
    ws.send(text);
  };
</script>
</html>
"#;
