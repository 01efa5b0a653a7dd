//! The simulated Kubernetes API (SPEC §12): enough of core/v1 (namespaces, pods, nodes) and
//! coordination.k8s.io/v1 (leases) for `kubectl get/apply/delete/-w` and `apilb load`.
//!
//! This file owns the HTTP side: which URL names which kind and object, the verbs (GET, LIST,
//! WATCH, CREATE, PUT, PATCH as a merge patch, DELETE), Status errors, and the watch stream.
//! The objects live in one [`store::Store`] that every simulated apiserver of a process shares
//! (as etcd is shared), so an object created through one apiserver is seen through the
//! others. Authentication is the apiserver's ([`super::apiserver`]); every authenticated user
//! may do everything (no RBAC), anonymous callers get 403.

pub mod kind;
pub mod select;
pub mod store;
pub mod table;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use self::select::Filter;
use self::store::{Kind, Store, StoreError, Stored, WatchFrom, WatchItem};

/// The body type of every answer.
pub type RespBody = BoxBody<Bytes, Infallible>;

/// The largest request body accepted (kube-apiserver's limit is 3 MiB).
const MAX_BODY: usize = 3 << 20;

/// The longest a watch runs when the client does not say (`timeoutSeconds`).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Whether `path` belongs to the simulated API (discovery included).
pub fn serves(path: &str) -> bool {
    path == "/api" || path == "/apis" || path.starts_with("/api/") || path.starts_with("/apis/")
}

/// Who is calling, as authentication found.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The user name.
    pub user: &'a str,
    /// The groups.
    pub groups: &'a [String],
}

impl Caller<'_> {
    /// The node name of a kubelet identity (`system:node:NAME` in `system:nodes`).
    fn node(&self) -> Option<&str> {
        self.user
            .strip_prefix("system:node:")
            .filter(|_| self.groups.iter().any(|g| g == "system:nodes"))
    }
}

/// What the NodeRestriction admission plugin allows a kubelet to write: its own Node and
/// its own Lease in `kube-node-lease`, and no pods (the simulated API has no mirror pods).
/// `None` when allowed, else the 403 message.
fn node_may_not(node: &str, kind: Kind, ns: Option<&str>, name: Option<&str>) -> Option<String> {
    let own = name == Some(node);
    let ok = match kind {
        Kind::Node => own,
        Kind::Lease => own && ns == Some("kube-node-lease"),
        Kind::Pod | Kind::Namespace => false,
    };
    (!ok).then(|| {
        format!(
            "{} \"{}\" is forbidden: node \"{node}\" is not allowed to modify it",
            kind.plural(),
            name.unwrap_or("")
        )
    })
}

/// Answers one API request for `caller` (`None`: anonymous, refused). Every authenticated
/// user may read everything; a kubelet identity may write only what NodeRestriction
/// lets it; other users may write everything (no RBAC).
pub async fn handle(
    store: &Arc<Store>,
    req: Request<Incoming>,
    caller: Option<Caller<'_>>,
) -> Response<RespBody> {
    let Some(caller) = caller else {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "forbidden: User \"system:anonymous\" cannot {} path \"{}\"",
                req.method().as_str().to_lowercase(),
                req.uri().path()
            ),
        );
    };
    store.seen(caller.user);
    let path = req.uri().path().trim_end_matches('/').to_string();
    if let Some(doc) = table::discovery(&path) {
        return json_response(StatusCode::OK, Bytes::from(doc.to_string()));
    }
    if let Some(code) = store.failing().and_then(|c| StatusCode::from_u16(c).ok()) {
        return status(
            code,
            "InternalError",
            "the simulated apiserver was told to fail",
        );
    }
    let Some(target) = Target::parse(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let as_table = table::wants_table(accept);
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let method = req.method().clone();
    let ns = target.namespace.as_deref();
    let node = caller.node();
    let forbidden = |m: String| status(StatusCode::FORBIDDEN, "Forbidden", &m);
    if let (Some(node), Some(_)) = (node, &target.name) {
        if method != Method::GET {
            if let Some(m) = node_may_not(node, target.kind, ns, target.name.as_deref()) {
                return forbidden(m);
            }
        }
    }
    match (&method, &target.name) {
        (&Method::GET, None) if query.watch => {
            store.count("watch");
            watch(store, &target, &query, as_table)
        }
        (&Method::GET, None) => {
            store.count("list");
            let filter = match Filter::new(target.kind, ns, &query.labels, &query.fields) {
                Ok(f) => f,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            };
            let (items, rv) = store.list(target.kind, &filter);
            if as_table {
                return json_response(
                    StatusCode::OK,
                    Bytes::from(table::table(target.kind, &items, rv, true).to_string()),
                );
            }
            json_response(StatusCode::OK, list_json(target.kind, &items, rv))
        }
        (&Method::GET, Some(name)) => {
            store.count("get");
            match store.get(target.kind, ns, name) {
                Ok(s) if as_table => json_response(
                    StatusCode::OK,
                    Bytes::from(
                        table::table(target.kind, &[s], store.resource_version(), true).to_string(),
                    ),
                ),
                Ok(s) => json_response(StatusCode::OK, s.json),
                Err(e) => store_error(&e),
            }
        }
        (&Method::POST, None) => {
            store.count("create");
            let body = match read_json(req, &content_type).await {
                Ok(v) => v,
                Err((code, reason, msg)) => return status(code, reason, &msg),
            };
            if let Some(node) = node {
                let name = body["metadata"]["name"].as_str();
                if let Some(m) = node_may_not(node, target.kind, ns, name) {
                    return forbidden(m);
                }
            }
            reply(StatusCode::CREATED, store.create(target.kind, ns, body))
        }
        (&Method::PUT, Some(name)) => {
            store.count("update");
            let body = match read_json(req, &content_type).await {
                Ok(v) => v,
                Err((code, reason, msg)) => return status(code, reason, &msg),
            };
            let name = name.clone();
            reply(StatusCode::OK, store.update(target.kind, ns, &name, body))
        }
        (&Method::PATCH, Some(name)) => {
            store.count("patch");
            let strategic = content_type.starts_with("application/strategic-merge-patch+json");
            if !(strategic || content_type.starts_with("application/merge-patch+json")) {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    &format!("the simulated API takes merge patches (application/merge-patch+json), not {content_type}"),
                );
            }
            let patch = match read_json(req, "application/json").await {
                Ok(v) => v,
                Err((code, reason, msg)) => return status(code, reason, &msg),
            };
            let name = name.clone();
            let result = store.modify(target.kind, ns, &name, |current| {
                let mut next = current.clone();
                merge_patch(&mut next, &patch, strategic);
                // A patch does not carry the precondition of the object it was made from.
                if patch
                    .get("metadata")
                    .and_then(|m| m.get("resourceVersion"))
                    .is_none()
                {
                    if let Some(m) = next.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove("resourceVersion");
                    }
                }
                Ok(next)
            });
            reply(StatusCode::OK, result)
        }
        (&Method::DELETE, Some(name)) => {
            store.count("delete");
            reply(StatusCode::OK, store.delete(target.kind, ns, name))
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("the server does not allow this method on the requested resource ({method})"),
        ),
    }
}

/// What `apilb demo` starts with: a node and a few pods, so `kubectl get pods -A` shows
/// something and `kubectl get nodes -w` has a node to watch.
pub fn seed_demo(store: &Store) {
    let node = json!({
        "metadata": {"name": "worker0", "labels": {"kubernetes.io/hostname": "worker0"}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "nodeInfo": {"kubeletVersion": "v1.32.0"},
        },
    });
    let _ = store.create(Kind::Node, None, node);
    for (ns, name, app) in [
        ("kube-system", "coredns-7db6d8ff4d-x2k9q", "kube-dns"),
        ("default", "web-0", "web"),
        ("default", "web-1", "web"),
    ] {
        let pod = json!({
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": "worker0", "containers": [{"name": app, "image": "registry.k8s.io/pause:3.10"}]},
            "status": {"phase": "Running", "containerStatuses": [{"name": app, "ready": true, "restartCount": 0}]},
        });
        let _ = store.create(Kind::Pod, Some(ns), pod);
    }
}

/// What a resource URL names.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Self> {
        let (group, rest) = if let Some(r) = path.strip_prefix("/api/v1/") {
            ("", r)
        } else if let Some(r) = path.strip_prefix("/apis/coordination.k8s.io/v1/") {
            ("coordination.k8s.io", r)
        } else {
            return None;
        };
        let seg: Vec<&str> = rest.split('/').collect();
        let namespaced = seg.len() >= 3 && seg[0] == "namespaces" && seg[2] != "status";
        let (namespace, seg) = if namespaced {
            (Some(seg[1].to_string()), &seg[2..])
        } else {
            (None, &seg[..])
        };
        let kind = Kind::from_plural(group, seg.first()?)?;
        if kind.namespaced() != namespace.is_some() && !(kind.namespaced() && seg.len() == 1) {
            return None;
        }
        let name = match seg {
            [_] => None,
            [_, name] | [_, name, "status"] if !name.is_empty() => Some((*name).to_string()),
            _ => return None,
        };
        Some(Self {
            kind,
            namespace,
            name,
        })
    }
}

#[derive(Debug, Default)]
struct Query {
    watch: bool,
    labels: String,
    fields: String,
    resource_version: Option<String>,
    timeout: Option<Duration>,
}

impl Query {
    fn parse(q: &str) -> Self {
        let mut out = Self::default();
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "watch" => out.watch = v == "1" || v == "true",
                "labelSelector" => out.labels = v,
                "fieldSelector" => out.fields = v,
                "resourceVersion" => out.resource_version = Some(v),
                "timeoutSeconds" => out.timeout = v.parse().ok().map(Duration::from_secs),
                _ => {}
            }
        }
        out
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn list_json(kind: Kind, items: &[Stored], rv: u64) -> Bytes {
    let mut out = Vec::with_capacity(items.iter().map(|s| s.json.len() + 1).sum::<usize>() + 128);
    out.extend_from_slice(
        format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{rv}\"}},\"items\":[",
            kind.name(),
            kind.api_version()
        )
        .as_bytes(),
    );
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&s.json);
    }
    out.extend_from_slice(b"]}\n");
    Bytes::from(out)
}

fn watch(store: &Arc<Store>, target: &Target, query: &Query, as_table: bool) -> Response<RespBody> {
    let filter = match Filter::new(
        target.kind,
        target.namespace.as_deref(),
        &query.labels,
        &query.fields,
    ) {
        Ok(f) => f,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let from = match query.resource_version.as_deref() {
        None | Some("") => WatchFrom::Now,
        Some("0") => WatchFrom::Any,
        Some(rv) => match rv.parse() {
            Ok(rv) => WatchFrom::After(rv),
            Err(_) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resource version: {rv:?}"),
                )
            }
        },
    };
    let kind = target.kind;
    let encode = move |first: bool, (t, s): &WatchItem| -> Bytes {
        if as_table {
            let rv = s
                .value
                .get("metadata")
                .and_then(|m| m.get("resourceVersion"))
                .and_then(Value::as_str)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            let obj = table::table(kind, std::slice::from_ref(s), rv, first);
            Bytes::from(format!(
                "{{\"type\":\"{}\",\"object\":{obj}}}\n",
                t.as_str()
            ))
        } else {
            let mut line = Vec::with_capacity(s.json.len() + 32);
            line.extend_from_slice(b"{\"type\":\"");
            line.extend_from_slice(t.as_str().as_bytes());
            line.extend_from_slice(b"\",\"object\":");
            line.extend_from_slice(&s.json);
            line.extend_from_slice(b"}\n");
            Bytes::from(line)
        }
    };
    let (backlog, rx) = match store.watch(filter, from) {
        Ok(sub) => {
            let backlog = sub
                .backlog
                .iter()
                .enumerate()
                .map(|(i, item)| encode(i == 0, item))
                .collect();
            (backlog, Some(sub.rx))
        }
        Err(StoreError::Gone(msg)) => {
            // As the watch cache does: a 200 whose one event is the 410.
            let err = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": msg, "reason": "Expired", "code": 410,
            }});
            (VecDeque::from([Bytes::from(format!("{err}\n"))]), None)
        }
        Err(e) => return store_error(&e),
    };
    let timeout = query.timeout.unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let had_backlog = !VecDeque::is_empty(&backlog);
    let body = WatchStream {
        backlog,
        rx,
        deadline: Box::pin(tokio::time::sleep(timeout)),
        first: !had_backlog,
        encode: Box::new(encode),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::CACHE_CONTROL, "no-cache, private")
        .body(BodyExt::boxed(body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

type Encoder = Box<dyn Fn(bool, &WatchItem) -> Bytes + Send + Sync>;

/// A watch's body: the backlog, then each event the store sends, until the watcher is
/// ended (too slow), the timeout passes, or the client goes away (which drops this and so
/// the receiver, which the store notices on its next send).
struct WatchStream {
    backlog: VecDeque<Bytes>,
    rx: Option<mpsc::Receiver<WatchItem>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    first: bool,
    encode: Encoder,
}

impl Body for WatchStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(b) = self.backlog.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        let Some(rx) = this.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                let first = std::mem::replace(&mut this.first, false);
                Poll::Ready(Some(Ok(Frame::data((this.encode)(first, &item)))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A request's JSON body, or the status, reason and message of why not.
async fn read_json(
    req: Request<Incoming>,
    content_type: &str,
) -> Result<Value, (StatusCode, &'static str, String)> {
    if !content_type.starts_with("application/json") && !content_type.is_empty() {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the simulated API reads JSON bodies, not {content_type}"),
        ));
    }
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                format!("cannot read the request body: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("the request body is not JSON: {e}"),
        )
    })
}

/// RFC 7386; for a strategic merge patch (what `kubectl apply` sends), its `$` directives
/// are dropped and lists are replaced, which is what it comes to for the fields the demo's
/// objects have.
fn merge_patch(target: &mut Value, patch: &Value, strategic: bool) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if strategic && k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v, strategic);
        }
    }
}

fn reply(ok: StatusCode, r: Result<Stored, StoreError>) -> Response<RespBody> {
    match r {
        Ok(s) => json_response(ok, s.json),
        Err(e) => store_error(&e),
    }
}

fn store_error(e: &StoreError) -> Response<RespBody> {
    match e {
        StoreError::NotFound(m) => status(StatusCode::NOT_FOUND, "NotFound", m),
        StoreError::AlreadyExists(m) => status(StatusCode::CONFLICT, "AlreadyExists", m),
        StoreError::Conflict(m) => status(StatusCode::CONFLICT, "Conflict", m),
        StoreError::Invalid(m) => status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", m),
        StoreError::Gone(m) => status(StatusCode::GONE, "Expired", m),
    }
}

fn json_response(code: StatusCode, body: Bytes) -> Response<RespBody> {
    Response::builder()
        .status(code)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// A `Status` error, as every apiserver error is.
pub fn status(code: StatusCode, reason: &str, message: &str) -> Response<RespBody> {
    let v = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    json_response(code, Bytes::from(v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_kinds_and_objects() {
        let t = |p: &str| Target::parse(p);
        assert_eq!(
            t("/api/v1/pods"),
            Some(Target {
                kind: Kind::Pod,
                namespace: None,
                name: None
            })
        );
        assert_eq!(
            t("/api/v1/namespaces/default/pods/web/status"),
            Some(Target {
                kind: Kind::Pod,
                namespace: Some("default".into()),
                name: Some("web".into())
            })
        );
        assert_eq!(
            t("/api/v1/namespaces/default"),
            Some(Target {
                kind: Kind::Namespace,
                namespace: None,
                name: Some("default".into())
            })
        );
        assert_eq!(
            t("/api/v1/namespaces/default/status"),
            Some(Target {
                kind: Kind::Namespace,
                namespace: None,
                name: Some("default".into())
            })
        );
        assert_eq!(
            t("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1"),
            Some(Target {
                kind: Kind::Lease,
                namespace: Some("kube-node-lease".into()),
                name: Some("n1".into())
            })
        );
        assert_eq!(
            t("/api/v1/nodes/n1"),
            Some(Target {
                kind: Kind::Node,
                namespace: None,
                name: Some("n1".into())
            })
        );
        assert_eq!(t("/api/v1/namespaces/default/nodes"), None);
        assert_eq!(t("/api/v1/pods/web"), None);
        assert_eq!(t("/api/v1/secrets"), None);
    }

    #[test]
    fn queries_are_decoded() {
        let q = Query::parse(
            "fieldSelector=spec.nodeName%3Dn1&watch=true&resourceVersion=42&timeoutSeconds=5",
        );
        assert!(q.watch);
        assert_eq!(q.fields, "spec.nodeName=n1");
        assert_eq!(q.resource_version.as_deref(), Some("42"));
        assert_eq!(q.timeout, Some(Duration::from_secs(5)));
        assert_eq!(percent_decode("a%2"), "a%2");
    }

    #[test]
    fn a_kubelet_writes_only_its_own_node_and_lease() {
        let groups = vec!["system:nodes".to_string()];
        let kubelet = Caller {
            user: "system:node:n1",
            groups: &groups,
        };
        assert_eq!(kubelet.node(), Some("n1"));
        let no_group = Caller {
            user: "system:node:n1",
            groups: &[],
        };
        assert_eq!(no_group.node(), None);
        assert!(node_may_not("n1", Kind::Node, None, Some("n1")).is_none());
        assert!(node_may_not("n1", Kind::Lease, Some("kube-node-lease"), Some("n1")).is_none());
        let m = node_may_not("n1", Kind::Node, None, Some("n2")).expect("forbidden");
        assert!(m.contains("node \"n1\" is not allowed"), "{m}");
        assert!(node_may_not("n1", Kind::Lease, Some("default"), Some("n1")).is_some());
        assert!(node_may_not("n1", Kind::Pod, Some("default"), Some("p")).is_some());
    }

    #[test]
    fn merge_patches() {
        let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]});
        merge_patch(
            &mut v,
            &json!({"b": {"c": null, "e": 4}, "l": [3], "$setElementOrder/l": []}),
            true,
        );
        assert_eq!(v, json!({"a": 1, "b": {"d": 3, "e": 4}, "l": [3]}));
    }
}
