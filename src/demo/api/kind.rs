//! The kinds the simulated API serves and the watch event types: plain nouns that the
//! store, the selectors and the handlers all use (a leaf module).

/// The resources the simulated API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// core/v1 Namespace (cluster-scoped).
    Namespace,
    /// core/v1 Node (cluster-scoped).
    Node,
    /// core/v1 Pod.
    Pod,
    /// coordination.k8s.io/v1 Lease.
    Lease,
}

impl Kind {
    /// Every kind, in discovery order.
    pub const ALL: [Self; 4] = [Self::Namespace, Self::Node, Self::Pod, Self::Lease];

    /// The `kind` field.
    pub fn name(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Node => "Node",
            Self::Pod => "Pod",
            Self::Lease => "Lease",
        }
    }

    /// The URL path segment.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Namespace => "namespaces",
            Self::Node => "nodes",
            Self::Pod => "pods",
            Self::Lease => "leases",
        }
    }

    /// The API group ("" for core).
    pub fn group(self) -> &'static str {
        match self {
            Self::Lease => "coordination.k8s.io",
            _ => "",
        }
    }

    /// The `apiVersion` field.
    pub fn api_version(self) -> &'static str {
        match self {
            Self::Lease => "coordination.k8s.io/v1",
            _ => "v1",
        }
    }

    /// Whether objects live in a namespace.
    pub fn namespaced(self) -> bool {
        matches!(self, Self::Pod | Self::Lease)
    }

    /// The kind whose plural is `plural` in `group`.
    pub fn from_plural(group: &str, plural: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.group() == group && k.plural() == plural)
    }
}

/// ADDED, MODIFIED, DELETED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// A new object (or one that came into a watcher's selection).
    Added,
    /// A changed object.
    Modified,
    /// A removed object (or one that left a watcher's selection).
    Deleted,
}

impl EventType {
    /// As on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}
