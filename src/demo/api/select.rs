//! Label and field selectors of the simulated API, and the [`Filter`] a LIST or WATCH
//! applies: kind, namespace, `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists, `!`)
//! and `fieldSelector` on `metadata.name`, `metadata.namespace` and `spec.nodeName`, the
//! fields kubelets and kubectl select on.

use serde_json::Value;

use super::kind::{EventType, Kind};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq(String),
    Ne(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    Absent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Req {
    key: String,
    op: Op,
}

impl Req {
    fn holds(&self, value: Option<&str>) -> bool {
        match (&self.op, value) {
            (Op::Eq(want), Some(v)) => v == want,
            (Op::Eq(want), None) => want.is_empty(),
            (Op::Ne(want), v) => v.unwrap_or("") != want,
            (Op::In(set), Some(v)) => set.iter().any(|s| s == v),
            (Op::In(_), None) => false,
            (Op::NotIn(set), v) => v.is_none_or(|v| !set.iter().any(|s| s == v)),
            (Op::Exists, v) => v.is_some(),
            (Op::Absent, v) => v.is_none(),
        }
    }
}

/// What a LIST or WATCH selects.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Of which kind.
    pub kind: Kind,
    /// In which namespace (`None`: all, or cluster-scoped).
    pub namespace: Option<String>,
    labels: Vec<Req>,
    fields: Vec<Req>,
}

/// The fields a `fieldSelector` may name.
const FIELDS: &[&str] = &["metadata.name", "metadata.namespace", "spec.nodeName"];

impl Filter {
    /// Parses the selectors of a request.
    ///
    /// # Errors
    /// A selector that does not parse, or a field that cannot be selected on; the message
    /// is the apiserver's kind of message for a 400.
    pub fn new(
        kind: Kind,
        namespace: Option<&str>,
        label_selector: &str,
        field_selector: &str,
    ) -> Result<Self, String> {
        let labels = parse(label_selector, true)?;
        let fields = parse(field_selector, false)?;
        for f in &fields {
            if !FIELDS.contains(&f.key.as_str()) || (f.key == "spec.nodeName" && kind != Kind::Pod)
            {
                return Err(format!(
                    "field label not supported: {} (the simulated API selects on {})",
                    f.key,
                    FIELDS.join(", ")
                ));
            }
        }
        Ok(Self {
            kind,
            namespace: namespace.map(str::to_string),
            labels,
            fields,
        })
    }

    /// The value an index can find this filter's objects by: for pods the node of a
    /// `spec.nodeName=X` field selector, for other kinds the name of `metadata.name=X`.
    pub fn index_key(&self) -> Option<&str> {
        let field = if self.kind == Kind::Pod {
            "spec.nodeName"
        } else {
            "metadata.name"
        };
        self.fields.iter().find_map(|r| match &r.op {
            Op::Eq(v) if r.key == field && !v.is_empty() => Some(v.as_str()),
            _ => None,
        })
    }

    /// Whether `obj` (of this filter's kind) is selected.
    pub fn matches(&self, obj: &Value) -> bool {
        let meta = obj.get("metadata");
        fn get<'a>(m: Option<&'a Value>, k: &str) -> Option<&'a str> {
            m.and_then(|m| m.get(k)).and_then(Value::as_str)
        }
        if let Some(ns) = &self.namespace {
            if get(meta, "namespace") != Some(ns.as_str()) {
                return false;
            }
        }
        let labels = meta.and_then(|m| m.get("labels"));
        if !self.labels.iter().all(|r| r.holds(get(labels, &r.key))) {
            return false;
        }
        self.fields.iter().all(|r| {
            let v = match r.key.as_str() {
                "metadata.name" => get(meta, "name"),
                "metadata.namespace" => get(meta, "namespace"),
                _ => get(obj.get("spec"), "nodeName"),
            };
            r.holds(v)
        })
    }

    /// The event this filter's watcher gets for a change of `kind` (`object` now, `before`
    /// it), if any: an object that enters the
    /// selection is ADDED for it, one that leaves is DELETED.
    pub fn sees(
        &self,
        kind: Kind,
        event: EventType,
        object: &Value,
        before: Option<&Value>,
    ) -> Option<EventType> {
        if kind != self.kind {
            return None;
        }
        let now = self.matches(object);
        let before = before.is_some_and(|b| self.matches(b));
        match event {
            EventType::Added => now.then_some(EventType::Added),
            EventType::Deleted => before.then_some(EventType::Deleted),
            EventType::Modified => match (before, now) {
                (true, true) => Some(EventType::Modified),
                (false, true) => Some(EventType::Added),
                (true, false) => Some(EventType::Deleted),
                (false, false) => None,
            },
        }
    }
}

/// Splits on commas outside parentheses.
fn terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0u32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse(selector: &str, sets: bool) -> Result<Vec<Req>, String> {
    let mut out = Vec::new();
    for term in terms(selector) {
        let bad = || format!("unable to parse requirement: {term:?}");
        let req = if let Some((k, v)) = term.split_once("!=") {
            Req {
                key: k.trim().into(),
                op: Op::Ne(v.trim().into()),
            }
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Req {
                key: k.trim().into(),
                op: Op::Eq(v.trim().into()),
            }
        } else if let Some(k) = term.strip_prefix('!').filter(|_| sets) {
            Req {
                key: k.trim().into(),
                op: Op::Absent,
            }
        } else if sets && term.contains('(') {
            let (head, rest) = term.split_once('(').ok_or_else(bad)?;
            let values: Vec<String> = rest
                .strip_suffix(')')
                .ok_or_else(bad)?
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            let mut words = head.split_whitespace();
            let key = words.next().ok_or_else(bad)?.to_string();
            let op = match words.next() {
                Some("in") => Op::In(values),
                Some("notin") => Op::NotIn(values),
                _ => return Err(bad()),
            };
            Req { key, op }
        } else if sets && !term.contains(char::is_whitespace) {
            Req {
                key: term.into(),
                op: Op::Exists,
            }
        } else {
            return Err(bad());
        };
        if req.key.is_empty() {
            return Err(bad());
        }
        out.push(req);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let pod = json!({"metadata": {"name": "a", "namespace": "default", "labels": {"app": "web", "tier": "front"}}});
        let yes = [
            "app=web",
            "app==web",
            "app!=db",
            "app in (web, db)",
            "tier notin (back)",
            "app",
            "!missing",
            "app=web,tier=front",
        ];
        for s in yes {
            let f = Filter::new(Kind::Pod, None, s, "").expect(s);
            assert!(f.matches(&pod), "{s} should select");
        }
        for s in [
            "app=db",
            "app in (db)",
            "missing",
            "!app",
            "app=web,tier=back",
        ] {
            let f = Filter::new(Kind::Pod, None, s, "").expect(s);
            assert!(!f.matches(&pod), "{s} should not select");
        }
        assert!(Filter::new(Kind::Pod, None, "app in web", "").is_err());
    }

    #[test]
    fn field_selectors() {
        let pod =
            json!({"metadata": {"name": "a", "namespace": "ns1"}, "spec": {"nodeName": "n1"}});
        let f = Filter::new(Kind::Pod, None, "", "spec.nodeName=n1").expect("f");
        assert!(f.matches(&pod));
        let f = Filter::new(Kind::Pod, Some("ns2"), "", "spec.nodeName=n1").expect("f");
        assert!(!f.matches(&pod));
        let f = Filter::new(Kind::Pod, None, "", "metadata.name!=a").expect("f");
        assert!(!f.matches(&pod));
        assert!(Filter::new(Kind::Pod, None, "", "status.phase=Running").is_err());
        assert!(Filter::new(Kind::Node, None, "", "spec.nodeName=x").is_err());
    }
}
