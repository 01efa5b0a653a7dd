//! The simulated API's one in-memory store: objects by kind, namespace and name, a global
//! resourceVersion counter, a bounded history of events for WATCH, and the fan-out to
//! watchers.
//!
//! Every mutation takes the one lock, bumps the counter, records the event and offers it to
//! each watcher with `try_send` on that watcher's bounded channel; a watcher whose channel is
//! full is dropped there and then (its stream ends after what it already has), as the real
//! watch cache ends a watcher that cannot keep up, so a slow reader never holds up the
//! others or the writer. Objects are kept with their JSON already serialised, so a LIST or
//! an event costs copies of bytes, not serialisation per reader.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

pub use super::kind::{EventType, Kind};
use super::select::Filter;

/// An object as stored: the parsed value (for selectors and patches) and its JSON.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The object.
    pub value: Arc<Value>,
    /// `value` serialised.
    pub json: Bytes,
}

impl Stored {
    fn new(value: Value) -> Self {
        let json = Bytes::from(value.to_string());
        Self {
            value: Arc::new(value),
            json,
        }
    }
}

/// One change, as the history keeps it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The resourceVersion the change made.
    pub rv: u64,
    /// Of what kind.
    pub kind: Kind,
    /// What happened to the object itself.
    pub event: EventType,
    /// The object after the change (for DELETED: as it was).
    pub object: Stored,
    /// The object before the change (MODIFIED and DELETED).
    pub before: Option<Arc<Value>>,
}

/// What a watcher receives: the event as this watcher's selection sees it.
pub type WatchItem = (EventType, Stored);

/// Why a store operation failed, as the apiserver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// 404.
    NotFound(String),
    /// 409 AlreadyExists.
    AlreadyExists(String),
    /// 409 Conflict (a stale resourceVersion).
    Conflict(String),
    /// 400 / 422: the object is unusable.
    Invalid(String),
    /// 410: the resourceVersion asked for is older than the history.
    Gone(String),
}

/// The limits of a store.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Events kept for WATCH from a resourceVersion; older ones get 410 Gone.
    pub history: usize,
    /// Events buffered per watcher before it is ended as too slow.
    pub watcher_buffer: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            history: 50_000,
            watcher_buffer: 1_000,
        }
    }
}

/// The verbs counted by [`Store::served`].
pub const VERBS: [&str; 7] = [
    "get", "list", "watch", "create", "update", "patch", "delete",
];

type Key = (Kind, String, String);

struct Watcher {
    filter: Filter,
    tx: mpsc::Sender<WatchItem>,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Stored>,
    history: VecDeque<Arc<Change>>,
    /// Every change up to here has left the history.
    compacted: u64,
    /// By kind and index value ([`Filter::index_key`]); `None` holds the watchers that
    /// select on something else, which see every change of their kind.
    watchers: HashMap<(Kind, Option<String>), Vec<Watcher>>,
    /// Pods by `spec.nodeName` (namespace, name): what a kubelet lists and watches.
    pods_by_node: HashMap<String, BTreeSet<(String, String)>>,
    uid: u64,
}

/// The value a watcher or a LIST can be looked up by: a pod's node, another object's name.
fn index_of(kind: Kind, obj: &Value) -> Option<&str> {
    match kind {
        Kind::Pod => obj.get("spec")?.get("nodeName")?.as_str(),
        _ => meta_str(obj, "name"),
    }
}

impl Inner {
    fn index_pod(&mut self, obj: &Value, add: bool) {
        let Some(node) = index_of(Kind::Pod, obj) else {
            return;
        };
        let key = (
            meta_str(obj, "namespace").unwrap_or("").to_string(),
            meta_str(obj, "name").unwrap_or("").to_string(),
        );
        if add {
            self.pods_by_node
                .entry(node.to_string())
                .or_default()
                .insert(key);
        } else if let Some(set) = self.pods_by_node.get_mut(node) {
            set.remove(&key);
            if set.is_empty() {
                self.pods_by_node.remove(node);
            }
        }
    }

    /// The objects `filter` selects, through an index when it has one.
    fn select(&self, filter: &Filter) -> Vec<Stored> {
        let kind = filter.kind;
        let pick = |key: &Key| {
            self.objects
                .get(key)
                .filter(|s| filter.matches(&s.value))
                .cloned()
        };
        match (kind, filter.index_key()) {
            (Kind::Pod, Some(node)) => self
                .pods_by_node
                .get(node)
                .into_iter()
                .flatten()
                .filter_map(|(ns, name)| pick(&(kind, ns.clone(), name.clone())))
                .collect(),
            (k, Some(name)) if !k.namespaced() => pick(&(kind, String::new(), name.to_string()))
                .into_iter()
                .collect(),
            (_, _) => {
                let ns = filter.namespace.clone().unwrap_or_default();
                let lo = (kind, ns.clone(), String::new());
                self.objects
                    .range(lo..)
                    .take_while(|((k, n, _), _)| {
                        *k == kind && (filter.namespace.is_none() || *n == ns)
                    })
                    .filter(|(_, s)| filter.matches(&s.value))
                    .map(|(_, s)| s.clone())
                    .collect()
            }
        }
    }
}

/// The store shared by the simulated apiservers of a process.
pub struct Store {
    inner: Mutex<Inner>,
    limits: StoreLimits,
    served: [AtomicU64; VERBS.len()],
    slow_watchers: AtomicU64,
    failing: AtomicU16,
    users: Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// What [`Store::watch`] gives: events already past (from the history, or the current
/// objects for resourceVersion "0") and the channel of those to come.
#[derive(Debug)]
pub struct Subscription {
    /// To send first, in order.
    pub backlog: Vec<WatchItem>,
    /// What follows.
    pub rx: mpsc::Receiver<WatchItem>,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchFrom {
    /// No resourceVersion: only changes from now on.
    Now,
    /// "0": every current object as ADDED, then changes.
    Any,
    /// Changes after this resourceVersion.
    After(u64),
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn meta_str<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get("metadata")?.get(field)?.as_str()
}

impl Store {
    /// A fresh cluster: the namespaces every cluster has, nothing else.
    pub fn new(limits: StoreLimits) -> Arc<Self> {
        let store = Arc::new(Self {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted: 1,
                watchers: HashMap::new(),
                pods_by_node: HashMap::new(),
                uid: 0,
            }),
            limits: StoreLimits {
                history: limits.history.max(1),
                watcher_buffer: limits.watcher_buffer.max(1),
            },
            served: Default::default(),
            slow_watchers: AtomicU64::new(0),
            failing: AtomicU16::new(0),
            users: Mutex::default(),
        });
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let _ = store.create(
                Kind::Namespace,
                None,
                serde_json::json!({"metadata": {"name": ns}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
            );
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: keep serving it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a request of `verb` (one of [`VERBS`]) as served.
    pub fn count(&self, verb: &str) {
        if let Some(i) = VERBS.iter().position(|v| *v == verb) {
            self.served[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests of `verb` served so far, by every apiserver sharing this store.
    pub fn served(&self, verb: &str) -> u64 {
        VERBS
            .iter()
            .position(|v| *v == verb)
            .map_or(0, |i| self.served[i].load(Ordering::Relaxed))
    }

    /// Notes that `user` made an API request (up to 100,000 distinct users are kept).
    pub fn seen(&self, user: &str) {
        let mut users = self
            .users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if users.len() < 100_000 && !users.contains(user) {
            users.insert(user.to_string());
        }
    }

    /// Whether `user` has made an API request.
    pub fn has_seen(&self, user: &str) -> bool {
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(user)
    }

    /// Makes every API request (discovery aside) answer `status` (a 5xx, say) until set
    /// back to `None`: a broken apiserver for the load generator's tests.
    pub fn set_failing(&self, status: Option<u16>) {
        self.failing.store(status.unwrap_or(0), Ordering::Relaxed);
    }

    /// The status set by [`Store::set_failing`].
    pub fn failing(&self) -> Option<u16> {
        Some(self.failing.load(Ordering::Relaxed)).filter(|s| *s != 0)
    }

    /// Watchers ended because they fell behind.
    pub fn slow_watchers_ended(&self) -> u64 {
        self.slow_watchers.load(Ordering::Relaxed)
    }

    /// Watchers connected right now.
    pub fn watchers(&self) -> usize {
        let mut inner = self.lock();
        inner.watchers.retain(|_, v| {
            v.retain(|w| !w.tx.is_closed());
            !v.is_empty()
        });
        inner.watchers.values().map(Vec::len).sum()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// One object.
    ///
    /// # Errors
    /// [`StoreError::NotFound`].
    pub fn get(&self, kind: Kind, ns: Option<&str>, name: &str) -> Result<Stored, StoreError> {
        let key = (kind, ns.unwrap_or("").to_string(), name.to_string());
        self.lock()
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| not_found(kind, name))
    }

    /// Every object of `kind` the filter selects, and the resourceVersion of the list.
    pub fn list(&self, kind: Kind, filter: &Filter) -> (Vec<Stored>, u64) {
        debug_assert_eq!(kind, filter.kind);
        let inner = self.lock();
        (inner.select(filter), inner.rv)
    }

    /// Starts a watch of what `filter` selects.
    ///
    /// # Errors
    /// [`StoreError::Gone`] when `from` is older than the history.
    pub fn watch(&self, filter: Filter, from: WatchFrom) -> Result<Subscription, StoreError> {
        let mut inner = self.lock();
        let backlog = match from {
            WatchFrom::Now => Vec::new(),
            WatchFrom::Any => inner
                .select(&filter)
                .into_iter()
                .map(|s| (EventType::Added, s))
                .collect(),
            WatchFrom::After(rv) if rv < inner.compacted => {
                return Err(StoreError::Gone(format!(
                    "too old resource version: {rv} ({})",
                    inner.compacted
                )));
            }
            WatchFrom::After(rv) => {
                // The history is in rv order: skip to the first change after `rv`.
                let start = inner.history.partition_point(|c| c.rv <= rv);
                inner
                    .history
                    .iter()
                    .skip(start)
                    .filter_map(|c| {
                        filter
                            .sees(c.kind, c.event, &c.object.value, c.before.as_deref())
                            .map(|t| (t, c.object.clone()))
                    })
                    .collect()
            }
        };
        let (tx, rx) = mpsc::channel(self.limits.watcher_buffer);
        let key = (filter.kind, filter.index_key().map(str::to_string));
        let list = inner.watchers.entry(key).or_default();
        list.retain(|w| !w.tx.is_closed());
        list.push(Watcher { filter, tx });
        Ok(Subscription { backlog, rx })
    }

    /// Creates an object; fills in uid, creationTimestamp, resourceVersion, kind, apiVersion.
    ///
    /// # Errors
    /// Invalid object, missing namespace, or a name already taken.
    pub fn create(
        &self,
        kind: Kind,
        ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Stored, StoreError> {
        let mut inner = self.lock();
        let name = name_of(&mut obj, inner.uid)?;
        let ns = check_namespace(kind, ns, &obj)?;
        if let Some(ns) = &ns {
            if !inner
                .objects
                .contains_key(&(Kind::Namespace, String::new(), ns.clone()))
            {
                return Err(not_found(Kind::Namespace, ns));
            }
        }
        let key = (kind, ns.clone().unwrap_or_default(), name.clone());
        if inner.objects.contains_key(&key) {
            return Err(StoreError::AlreadyExists(format!(
                "{} \"{name}\" already exists",
                kind.plural()
            )));
        }
        inner.uid += 1;
        inner.rv += 1;
        let (rv, uid) = (inner.rv, inner.uid);
        stamp(&mut obj, kind, ns.as_deref(), rv);
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert(
                "uid".into(),
                Value::String(format!("00000000-0000-4000-8000-{uid:012x}")),
            );
            m.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
        }
        let stored = Stored::new(obj);
        inner.objects.insert(key, stored.clone());
        self.publish(&mut inner, kind, EventType::Added, stored.clone(), None);
        Ok(stored)
    }

    /// Replaces an object (PUT); a resourceVersion in the body must be the current one.
    ///
    /// # Errors
    /// Not found, stale resourceVersion, or an invalid object.
    pub fn update(
        &self,
        kind: Kind,
        ns: Option<&str>,
        name: &str,
        obj: Value,
    ) -> Result<Stored, StoreError> {
        self.modify(kind, ns, name, |_| Ok(obj))
    }

    /// Changes an object with `f(current) -> new` under the lock (PATCH, and PUT).
    ///
    /// # Errors
    /// Not found, what `f` returns, a stale resourceVersion in the new object.
    pub fn modify(
        &self,
        kind: Kind,
        ns: Option<&str>,
        name: &str,
        f: impl FnOnce(&Value) -> Result<Value, StoreError>,
    ) -> Result<Stored, StoreError> {
        let mut inner = self.lock();
        let key = (kind, ns.unwrap_or("").to_string(), name.to_string());
        let Some(current) = inner.objects.get(&key).cloned() else {
            return Err(not_found(kind, name));
        };
        let mut obj = f(&current.value)?;
        if !obj.is_object() {
            return Err(StoreError::Invalid(
                "the object must be a JSON object".into(),
            ));
        }
        if meta_str(&obj, "name").is_some_and(|n| n != name) {
            return Err(StoreError::Invalid(format!(
                "the name of the object ({}) does not match the name in the URL ({name})",
                meta_str(&obj, "name").unwrap_or_default()
            )));
        }
        match meta_str(&obj, "resourceVersion") {
            Some(rv) if Some(rv) != meta_str(&current.value, "resourceVersion") => {
                return Err(StoreError::Conflict(format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    kind.plural()
                )));
            }
            _ => {}
        }
        // What the server owns stays as it was.
        for field in ["uid", "creationTimestamp", "name", "namespace"] {
            if let Some(v) = current.value.get("metadata").and_then(|m| m.get(field)) {
                if let Some(m) = meta_mut(&mut obj) {
                    m.insert(field.into(), v.clone());
                }
            }
        }
        inner.rv += 1;
        let rv = inner.rv;
        stamp(&mut obj, kind, ns, rv);
        let stored = Stored::new(obj);
        inner.objects.insert(key, stored.clone());
        self.publish(
            &mut inner,
            kind,
            EventType::Modified,
            stored.clone(),
            Some(current.value),
        );
        Ok(stored)
    }

    /// Deletes an object and returns it as it was (with the deletion's resourceVersion).
    ///
    /// # Errors
    /// [`StoreError::NotFound`].
    pub fn delete(&self, kind: Kind, ns: Option<&str>, name: &str) -> Result<Stored, StoreError> {
        let mut inner = self.lock();
        let key = (kind, ns.unwrap_or("").to_string(), name.to_string());
        let Some(current) = inner.objects.remove(&key) else {
            return Err(not_found(kind, name));
        };
        if kind == Kind::Namespace {
            // Its objects go with it (the namespace controller's work, done at once).
            inner
                .objects
                .retain(|(k, n, _), _| !(k.namespaced() && n == name));
            for set in inner.pods_by_node.values_mut() {
                set.retain(|(ns, _)| ns != name);
            }
            inner.pods_by_node.retain(|_, set| !set.is_empty());
        }
        inner.rv += 1;
        let rv = inner.rv;
        let mut obj = (*current.value).clone();
        stamp(&mut obj, kind, ns, rv);
        let stored = Stored::new(obj);
        self.publish(
            &mut inner,
            kind,
            EventType::Deleted,
            stored.clone(),
            Some(current.value),
        );
        Ok(stored)
    }

    fn publish(
        &self,
        inner: &mut Inner,
        kind: Kind,
        event: EventType,
        object: Stored,
        before: Option<Arc<Value>>,
    ) {
        let change = Arc::new(Change {
            rv: inner.rv,
            kind,
            event,
            object,
            before,
        });
        inner.history.push_back(change.clone());
        while inner.history.len() > self.limits.history {
            if let Some(old) = inner.history.pop_front() {
                inner.compacted = old.rv;
            }
        }
        if kind == Kind::Pod {
            if let Some(b) = &change.before {
                inner.index_pod(b, false);
            }
            if event != EventType::Deleted {
                inner.index_pod(&change.object.value, true);
            }
        }
        // Only the watchers that can see this change: those that select on something else,
        // and those on the object's index value now and before.
        let mut keys = vec![(kind, None)];
        for v in [Some(&*change.object.value), change.before.as_deref()]
            .into_iter()
            .flatten()
        {
            let k = (kind, index_of(kind, v).map(str::to_string));
            if k.1.is_some() && !keys.contains(&k) {
                keys.push(k);
            }
        }
        let mut slow = 0;
        for key in keys {
            let Some(list) = inner.watchers.get_mut(&key) else {
                continue;
            };
            list.retain(|w| {
                let Some(t) = w.filter.sees(
                    change.kind,
                    change.event,
                    &change.object.value,
                    change.before.as_deref(),
                ) else {
                    return !w.tx.is_closed();
                };
                match w.tx.try_send((t, change.object.clone())) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        slow += 1;
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
            if list.is_empty() {
                inner.watchers.remove(&key);
            }
        }
        if slow > 0 {
            self.slow_watchers.fetch_add(slow, Ordering::Relaxed);
            tracing::info!(
                ended = slow,
                "simulated API: ended watchers that fell behind"
            );
        }
    }
}

fn not_found(kind: Kind, name: &str) -> StoreError {
    let what = if kind.group().is_empty() {
        kind.plural().to_string()
    } else {
        format!("{}.{}", kind.plural(), kind.group())
    };
    StoreError::NotFound(format!("{what} \"{name}\" not found"))
}

fn meta_mut(obj: &mut Value) -> Option<&mut serde_json::Map<String, Value>> {
    obj.as_object_mut()?
        .entry("metadata")
        .or_insert_with(|| Value::Object(serde_json::Map::new()))
        .as_object_mut()
}

/// The object's name, from `metadata.name` or made from `metadata.generateName`.
fn name_of(obj: &mut Value, seq: u64) -> Result<String, StoreError> {
    if !obj.is_object() {
        return Err(StoreError::Invalid(
            "the object must be a JSON object".into(),
        ));
    }
    if let Some(n) = meta_str(obj, "name").filter(|n| !n.is_empty()) {
        return valid_name(n).map(|()| n.to_string());
    }
    if let Some(prefix) = meta_str(obj, "generateName").map(str::to_string) {
        let name = format!("{prefix}{:05x}", (seq + 1) * 7919 % 0x10_0000);
        if let Some(m) = meta_mut(obj) {
            m.insert("name".into(), Value::String(name.clone()));
        }
        return Ok(name);
    }
    Err(StoreError::Invalid(
        "metadata.name: Required value: name or generateName is required".into(),
    ))
}

fn valid_name(n: &str) -> Result<(), StoreError> {
    let ok = n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !n.starts_with(['-', '.'])
        && !n.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "metadata.name: Invalid value: \"{n}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
        )))
    }
}

/// The namespace an object goes in: the URL's, which a namespace in the body must match.
fn check_namespace(
    kind: Kind,
    url: Option<&str>,
    obj: &Value,
) -> Result<Option<String>, StoreError> {
    if !kind.namespaced() {
        return Ok(None);
    }
    let body = meta_str(obj, "namespace");
    match (url, body) {
        (Some(u), Some(b)) if u != b => Err(StoreError::Invalid(format!(
            "the namespace of the provided object ({b}) does not match the namespace sent on the request ({u})"
        ))),
        (Some(u), _) => Ok(Some(u.to_string())),
        (None, _) => Err(StoreError::Invalid(format!(
            "{} must be created in a namespace",
            kind.plural()
        ))),
    }
}

/// Sets what the server always sets.
fn stamp(obj: &mut Value, kind: Kind, ns: Option<&str>, rv: u64) {
    if let Some(o) = obj.as_object_mut() {
        o.insert("kind".into(), Value::String(kind.name().into()));
        o.insert(
            "apiVersion".into(),
            Value::String(kind.api_version().into()),
        );
    }
    if let Some(m) = meta_mut(obj) {
        m.insert("resourceVersion".into(), Value::String(rv.to_string()));
        if let Some(ns) = ns {
            m.insert("namespace".into(), Value::String(ns.into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": "web"}}, "spec": {"nodeName": node}})
    }

    fn all(kind: Kind) -> Filter {
        Filter::new(kind, None, "", "").expect("filter")
    }

    #[test]
    fn resource_versions_grow_and_history_is_bounded() {
        let store = Store::new(StoreLimits {
            history: 3,
            watcher_buffer: 10,
        });
        let rv0 = store.resource_version();
        for i in 0..5 {
            store
                .create(Kind::Pod, Some("default"), pod(&format!("p{i}"), "n1"))
                .expect("create");
        }
        assert_eq!(store.resource_version(), rv0 + 5);
        // The last three changes are still there, the older ones are not.
        let sub = store
            .watch(all(Kind::Pod), WatchFrom::After(rv0 + 2))
            .expect("recent enough");
        assert_eq!(sub.backlog.len(), 3);
        assert!(matches!(
            store.watch(all(Kind::Pod), WatchFrom::After(rv0)),
            Err(StoreError::Gone(_))
        ));
    }

    #[test]
    fn a_slow_watcher_is_ended_and_the_others_go_on() {
        let store = Store::new(StoreLimits {
            history: 100,
            watcher_buffer: 2,
        });
        let mut slow = store.watch(all(Kind::Pod), WatchFrom::Now).expect("watch");
        let mut fast = store.watch(all(Kind::Pod), WatchFrom::Now).expect("watch");
        let mut seen = 0;
        for i in 0..10 {
            store
                .create(Kind::Pod, Some("default"), pod(&format!("p{i}"), "n1"))
                .expect("create");
            while fast.rx.try_recv().is_ok() {
                seen += 1;
            }
        }
        assert_eq!(seen, 10);
        assert_eq!(store.slow_watchers_ended(), 1);
        // The slow one gets what fitted, then its stream ends.
        let mut got = 0;
        while let Ok(_e) = slow.rx.try_recv() {
            got += 1;
        }
        assert_eq!(got, 2);
        assert!(slow.rx.is_closed());
    }

    #[test]
    fn a_watch_sees_objects_enter_and_leave_its_selection() {
        let store = Store::new(StoreLimits::default());
        let f = Filter::new(Kind::Pod, Some("default"), "app=web", "").expect("filter");
        let mut sub = store.watch(f, WatchFrom::Now).expect("watch");
        store
            .create(Kind::Pod, Some("default"), pod("a", "n1"))
            .expect("create");
        store
            .modify(Kind::Pod, Some("default"), "a", |v| {
                let mut v = v.clone();
                v["metadata"]["labels"]["app"] = json!("db");
                Ok(v)
            })
            .expect("modify");
        let (t1, _) = sub.rx.try_recv().expect("added");
        let (t2, _) = sub.rx.try_recv().expect("left");
        assert_eq!((t1, t2), (EventType::Added, EventType::Deleted));
    }

    #[test]
    fn indexed_lists_and_watches_see_what_a_scan_would() {
        let store = Store::new(StoreLimits::default());
        let on = |node: &str| {
            Filter::new(Kind::Pod, None, "", &format!("spec.nodeName={node}")).expect("f")
        };
        assert_eq!(on("n1").index_key(), Some("n1"));
        let mut n1 = store.watch(on("n1"), WatchFrom::Now).expect("watch");
        let mut n2 = store.watch(on("n2"), WatchFrom::Now).expect("watch");
        let mut all = store.watch(all(Kind::Pod), WatchFrom::Now).expect("watch");
        store
            .create(Kind::Pod, Some("default"), pod("a", "n1"))
            .expect("create");
        store
            .create(Kind::Pod, Some("kube-system"), pod("b", "n2"))
            .expect("create");
        // A pod that moves leaves one node's watch and enters the other's.
        store
            .modify(Kind::Pod, Some("default"), "a", |v| {
                let mut v = v.clone();
                v["spec"]["nodeName"] = json!("n2");
                Ok(v)
            })
            .expect("move");
        let drain = |rx: &mut mpsc::Receiver<WatchItem>| {
            let mut v = Vec::new();
            while let Ok((t, s)) = rx.try_recv() {
                v.push((t, meta_str(&s.value, "name").unwrap_or("").to_string()));
            }
            v
        };
        use EventType::{Added, Deleted};
        assert_eq!(
            drain(&mut n1.rx),
            [(Added, "a".into()), (Deleted, "a".into())]
        );
        assert_eq!(
            drain(&mut n2.rx),
            [(Added, "b".into()), (Added, "a".into())]
        );
        assert_eq!(drain(&mut all.rx).len(), 3);
        assert!(drain(&mut all.rx).is_empty());
        let names = |f: &Filter| {
            let mut v: Vec<String> = store
                .list(Kind::Pod, f)
                .0
                .iter()
                .filter_map(|s| meta_str(&s.value, "name").map(str::to_string))
                .collect();
            v.sort();
            v
        };
        assert!(names(&on("n1")).is_empty());
        assert_eq!(names(&on("n2")), ["a", "b"]);
        store
            .delete(Kind::Namespace, None, "kube-system")
            .expect("delete namespace");
        assert_eq!(names(&on("n2")), ["a"]);
        let node = Filter::new(Kind::Node, None, "", "metadata.name=x").expect("f");
        assert!(store.list(Kind::Node, &node).0.is_empty());
    }

    #[test]
    fn stale_updates_conflict_and_names_are_checked() {
        let store = Store::new(StoreLimits::default());
        let created = store
            .create(Kind::Node, None, json!({"metadata": {"name": "n1"}}))
            .expect("create");
        let rv = meta_str(&created.value, "resourceVersion")
            .expect("rv")
            .to_string();
        store
            .update(
                Kind::Node,
                None,
                "n1",
                json!({"metadata": {"name": "n1", "resourceVersion": rv}}),
            )
            .expect("current rv");
        assert!(matches!(
            store.update(
                Kind::Node,
                None,
                "n1",
                json!({"metadata": {"name": "n1", "resourceVersion": rv}})
            ),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store.create(Kind::Node, None, json!({"metadata": {"name": "Bad_Name"}})),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.create(Kind::Pod, Some("nowhere"), pod("x", "n1")),
            Err(StoreError::NotFound(_))
        ));
    }
}
