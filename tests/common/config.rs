//! Test configs built section by section: a test says what it changes, and no config text is
//! edited by searching and replacing.

use super::SECRET;

/// `proxy.toml` for a test: by default an HS256 policy `main` keyed with [`SECRET`], one route
/// at `/ws/chat` to the given upstream, the listener and the admin listener on 127.0.0.1:0.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    listen: String,
    server: Vec<String>,
    admin: bool,
    log: Vec<String>,
    /// The lines of `[auth.main]` that choose its algorithms and key.
    keys: Vec<String>,
    policy: Vec<String>,
    sections: Vec<String>,
    path: String,
    upstreams: Vec<String>,
    auth: String,
    route: Vec<String>,
}

impl EdgeConfig {
    pub fn new(upstream: &str) -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            server: Vec::new(),
            admin: true,
            log: Vec::new(),
            keys: vec![
                "algorithms = [\"HS256\"]".into(),
                format!("secret = \"{SECRET}\""),
            ],
            policy: Vec::new(),
            sections: Vec::new(),
            path: "/ws/chat".into(),
            upstreams: vec![upstream.into()],
            auth: "main".into(),
            route: Vec::new(),
        }
    }

    /// The listen address (default 127.0.0.1:0).
    pub fn listen(mut self, address: &str) -> Self {
        self.listen = address.into();
        self
    }

    /// A line (or lines) for `[server]`.
    pub fn server(mut self, lines: &str) -> Self {
        self.server.push(lines.into());
        self
    }

    /// No `[admin]` table.
    pub fn without_admin(mut self) -> Self {
        self.admin = false;
        self
    }

    /// A line for `[log]`.
    pub fn log(mut self, lines: &str) -> Self {
        self.log.push(lines.into());
        self
    }

    /// The algorithms and key of `[auth.main]`, instead of HS256 with `SECRET`.
    pub fn keys(mut self, lines: &str) -> Self {
        self.keys = vec![lines.into()];
        self
    }

    /// A further line for `[auth.main]`.
    pub fn policy(mut self, lines: &str) -> Self {
        self.policy.push(lines.into());
        self
    }

    /// A whole further table (another policy or route), as written.
    pub fn section(mut self, text: &str) -> Self {
        self.sections.push(text.into());
        self
    }

    /// The route's path (default `/ws/chat`).
    pub fn path(mut self, path: &str) -> Self {
        self.path = path.into();
        self
    }

    /// Several upstream targets for the route.
    pub fn upstreams(mut self, urls: &[&str]) -> Self {
        self.upstreams = urls.iter().map(|url| url.to_string()).collect();
        self
    }

    /// The route's policy (default `main`; `none` for none).
    pub fn auth(mut self, name: &str) -> Self {
        self.auth = name.into();
        self
    }

    /// A line (or lines) for the route.
    pub fn route(mut self, lines: &str) -> Self {
        self.route.push(lines.into());
        self
    }

    pub fn build(&self) -> String {
        let mut text = format!("[server]\nlisten = [\"{}\"]\n", self.listen);
        for line in &self.server {
            text.push_str(&format!("{line}\n"));
        }
        if self.admin {
            text.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
        }
        if !self.log.is_empty() {
            text.push_str("\n[log]\n");
            for line in &self.log {
                text.push_str(&format!("{line}\n"));
            }
        }
        text.push_str("\n[auth.main]\nkind = \"jwt\"\n");
        for line in self.keys.iter().chain(&self.policy) {
            text.push_str(&format!("{line}\n"));
        }
        for section in &self.sections {
            text.push_str(&format!("\n{section}\n"));
        }
        text.push_str(&format!("\n[[route]]\npath = \"{}\"\n", self.path));
        match self.upstreams.as_slice() {
            [one] => text.push_str(&format!("upstream = \"{one}\"\n")),
            many => {
                let quoted: Vec<String> = many.iter().map(|url| format!("\"{url}\"")).collect();
                text.push_str(&format!("upstreams = [{}]\n", quoted.join(", ")));
            }
        }
        text.push_str(&format!("auth = \"{}\"\n", self.auth));
        for line in &self.route {
            text.push_str(&format!("{line}\n"));
        }
        text
    }
}
