//! Routes at run time: matching a request to a route, and what each route keeps while the
//! edge runs — its label, its upstream targets' health and round-robin position, and its
//! metric handles. Rebuilt from the settings at start and on every reload.

use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use crate::config::settings::{PathMatch, RouteSettings};
use crate::metrics::{Metrics, RouteMetrics};
use crate::upstream::http::HttpClients;
use crate::upstream::targets::Targets;

pub(crate) struct Route {
    settings: Arc<RouteSettings>,
    /// A short label for logs and metrics: the host (if any) and path.
    pub(crate) label: Arc<str>,
    pub(crate) targets: Targets,
    /// Pooled connections to each target, when the route proxies plain HTTP.
    pub(crate) http_clients: Option<HttpClients>,
    /// This route's metric handles, resolved at its first connection.
    metrics: OnceLock<RouteMetrics>,
}

impl Deref for Route {
    type Target = RouteSettings;
    fn deref(&self) -> &RouteSettings {
        &self.settings
    }
}

impl Route {
    fn new(settings: Arc<RouteSettings>) -> Self {
        Self {
            label: settings.label().into(),
            targets: Targets::new(&settings.targets),
            http_clients: settings.http.as_ref().map(|_| HttpClients::new(&settings)),
            settings,
            metrics: OnceLock::new(),
        }
    }

    /// The route's metric handles (each lookup by label takes a lock and an allocation, so
    /// they are resolved once per route rather than once per handshake).
    pub(crate) fn metrics(&self, metrics: &Metrics) -> &RouteMetrics {
        self.metrics
            .get_or_init(|| metrics.for_route(&self.label, self.http.is_some()))
    }
}

/// The routes of one config, in match order.
pub(crate) struct Router {
    /// Most specific first: host-specific before host-less, longer paths first, exact before
    /// prefix.
    routes: Vec<Route>,
}

impl Router {
    pub(crate) fn new(settings: &[Arc<RouteSettings>]) -> Self {
        let mut routes: Vec<Route> = settings.iter().cloned().map(Route::new).collect();
        routes.sort_by_key(|route| {
            (
                route.host.is_none(),
                std::cmp::Reverse(route.path.path().len()),
                matches!(route.path, PathMatch::Prefix(_)),
            )
        });
        Self { routes }
    }

    /// The route whose label is `label` (what another edge names a session's route by).
    pub(crate) fn by_label(&self, label: &str) -> Option<&Route> {
        self.routes.iter().find(|route| &*route.label == label)
    }

    pub(crate) fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes.iter().find(|route| {
            route.path.matches(path) && route.host.as_ref().is_none_or(|h| h.matches(host))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_match_wins_and_host_routes_come_first() {
        let settings = |path, host| Arc::new(RouteSettings::for_test(path, host));
        let router = Router::new(&[
            settings(PathMatch::Prefix("/ws".into()), None),
            settings(PathMatch::Prefix("/ws/chat".into()), None),
            settings(PathMatch::Exact("/ws/chat".into()), None),
            settings(PathMatch::Prefix("/ws".into()), Some("admin.example.com")),
        ]);
        let label = |host, path| router.find(host, path).map(|r| r.label.to_string());
        assert_eq!(label(None, "/ws/chat").as_deref(), Some("/ws/chat"));
        assert_eq!(label(None, "/ws/chat/7").as_deref(), Some("/ws/chat*"));
        assert_eq!(label(None, "/ws/other").as_deref(), Some("/ws*"));
        assert_eq!(label(None, "/wsx"), None);
        assert_eq!(
            label(Some("ADMIN.example.com"), "/ws/chat").as_deref(),
            Some("admin.example.com/ws*")
        );
        assert_eq!(label(None, "/"), None);
    }
}
