//! Building and recognising the topics of docs/PROTOCOL.md §4: `{prefix}/{device}/...`.

/// The topic names of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

/// What an incoming topic is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming<'a> {
    Desired,
    Command(&'a str),
}

impl Topics {
    pub fn new(prefix: &str, device: &str) -> Self {
        Self {
            base: format!("{prefix}/{device}"),
        }
    }

    /// `P/D/{suffix}`.
    pub fn under(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.base)
    }

    pub fn reported(&self) -> String {
        format!("{}/reported", self.base)
    }
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }
    pub fn desired(&self) -> String {
        format!("{}/desired", self.base)
    }
    pub fn desired_result(&self) -> String {
        format!("{}/desired/result", self.base)
    }
    pub fn metrics(&self) -> String {
        format!("{}/metrics", self.base)
    }
    pub fn command(&self, name: &str) -> String {
        format!("{}/cmd/{name}", self.base)
    }
    pub fn command_filter(&self) -> String {
        format!("{}/cmd/+", self.base)
    }
    pub fn command_result(&self, name: &str) -> String {
        format!("{}/cmd/{name}/result", self.base)
    }

    /// Filters that may have delivered `topic`, a topic the agent does not act on (MQTT does
    /// not say which filter matched): the wildcards a leftover subscription most likely has
    /// (`#`, `+/#`, the first levels followed by `#`, the device level as `+`) and the topic
    /// itself; at most 9, never the agent's own filters. Unsubscribing a filter that was
    /// never subscribed is harmless.
    pub fn stray_filters(&self, topic: &str) -> Vec<String> {
        let l: Vec<&str> = topic.split('/').collect();
        let n = l.len();
        let mut out: Vec<String> = vec!["#".to_owned(), format!("{}/#", l[0])];
        if n > 2 {
            out.push(format!("{}/{}/#", l[0], l[1]));
        }
        if n > 3 {
            out.push(format!("{}/{}/{}/#", l[0], l[1], l[2]));
        }
        if n > 1 {
            out.push(format!("{}/+/#", l[0]));
            out.push("+/#".to_owned());
        }
        if n > 2 {
            out.push(format!("{}/+/{}", l[0], l[2..].join("/")));
            out.push(format!("{}/+", l[..n - 1].join("/")));
        }
        out.push(topic.to_owned());
        let own = [self.desired(), self.command_filter()];
        let mut seen = Vec::new();
        out.retain(|f| {
            let keep = !own.contains(f) && !seen.contains(f);
            seen.push(f.clone());
            keep
        });
        out
    }

    /// Recognises a topic the agent acts on; anything else (other devices, wildcards,
    /// results, malformed names) is `None`.
    pub fn parse<'a>(&self, topic: &'a str) -> Option<Incoming<'a>> {
        let rest = topic.strip_prefix(self.base.as_str())?.strip_prefix('/')?;
        if rest == "desired" {
            return Some(Incoming::Desired);
        }
        let name = rest.strip_prefix("cmd/")?;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        valid.then_some(Incoming::Command(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_spec() {
        let t = Topics::new("edgesync", "pump-1");
        assert_eq!(t.reported(), "edgesync/pump-1/reported");
        assert_eq!(t.status(), "edgesync/pump-1/status");
        assert_eq!(t.desired_result(), "edgesync/pump-1/desired/result");
        assert_eq!(t.command_result("ping"), "edgesync/pump-1/cmd/ping/result");
        assert_eq!(t.metrics(), "edgesync/pump-1/metrics");
    }

    #[test]
    fn stray_filters_cover_the_likely_wildcards_and_never_our_own() {
        let t = Topics::new("p", "d");
        let f = t.stray_filters("p/d/cmd/ping/result");
        for want in [
            "#",
            "p/#",
            "p/d/#",
            "p/d/cmd/#",
            "p/+/#",
            "+/#",
            "p/+/cmd/ping/result",
            "p/d/cmd/ping/+",
            "p/d/cmd/ping/result",
        ] {
            assert!(f.contains(&want.to_owned()), "{want}: {f:?}");
        }
        assert_eq!(f.len(), 9, "{f:?}");
        let f = t.stray_filters("p/d/status");
        assert!(f.contains(&"p/d/+".to_owned()), "{f:?}");
        assert!(f.contains(&"p/+/status".to_owned()), "{f:?}");
        // Our own filters stay.
        let f = t.stray_filters("p/d/cmd/x");
        assert!(!f.contains(&"p/d/cmd/+".to_owned()), "{f:?}");
        assert_eq!(t.stray_filters("x"), ["#", "x/#", "x"]);
        let deep = vec!["a"; 1000].join("/");
        assert!(t.stray_filters(&deep).len() <= 9);
    }

    #[test]
    fn only_own_desired_and_command_topics_are_recognised() {
        let t = Topics::new("p", "d");
        assert_eq!(t.parse("p/d/desired"), Some(Incoming::Desired));
        assert_eq!(t.parse("p/d/cmd/ping"), Some(Incoming::Command("ping")));
        for other in [
            "p/e/desired",
            "p/dd/desired",
            "p/d/desired/result",
            "p/d/cmd/ping/result",
            "p/d/cmd/",
            "p/d/cmd/+",
            "p/d/cmd/#",
            "p/d/cmd/a/b",
            "p/d",
            "p/d/",
            "p/d/reported",
            "q/d/desired",
            "",
        ] {
            assert_eq!(t.parse(other), None, "{other}");
        }
    }
}
