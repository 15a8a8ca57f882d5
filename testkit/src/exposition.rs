//! A strict reader of the Prometheus text format (0.0.4), to check what the agent's
//! `edgesync::metrics::prometheus` writes (the `[telemetry] textfile` exposition): its
//! unit tests and tests/ops.rs parse the text with [`parse`] and look samples up with
//! [`samples_by_series`].

use std::collections::{BTreeMap, HashSet};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The value of label `k`.
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels.get(k).map(String::as_str)
    }
}

/// The samples of `text`, or the first violation (with its line number). Enforced:
/// every line ends with a newline; valid metric and label names; `# TYPE` once per
/// family, before its samples, with a known type; `# HELP` at most once; a family's
/// samples are together; label values properly quoted and escaped; no duplicate
/// label names or series; values are floats.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the text does not end with a newline".into());
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut series: HashSet<String> = HashSet::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix('#') {
            let mut words = rest.trim_start().splitn(3, ' ');
            let (kw, name, tail) = (words.next(), words.next(), words.next());
            match (kw, name) {
                (Some("HELP"), Some(name)) => {
                    check_name(name).map_err(at)?;
                    if !helps.insert(name.to_owned()) {
                        return Err(at("a second HELP".into()));
                    }
                }
                (Some("TYPE"), Some(name)) => {
                    check_name(name).map_err(at)?;
                    let kind = tail.unwrap_or_default();
                    if !["counter", "gauge", "untyped", "histogram", "summary"].contains(&kind) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at("a second TYPE".into()));
                    }
                    if finished.contains(name) || current.as_deref() == Some(name) {
                        return Err(at("TYPE after samples of the family".into()));
                    }
                }
                _ => {} // a comment
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let s = sample(line).map_err(at)?;
        if !types.contains_key(&s.name) {
            return Err(at("a sample without a TYPE".into()));
        }
        if current.as_deref() != Some(s.name.as_str()) {
            if finished.contains(&s.name) {
                return Err(at("the family's samples are not together".into()));
            }
            if let Some(c) = current.replace(s.name.clone()) {
                finished.insert(c);
            }
        }
        let key = format!("{}{:?}", s.name, s.labels);
        if !series.insert(key) {
            return Err(at("a duplicate series".into()));
        }
        samples.push(s);
    }
    Ok(samples)
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid metric name {name:?}"))
    }
}

fn check_label_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid label name {name:?}"))
    }
}

fn sample(line: &str) -> Result<Sample, String> {
    let end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..end];
    check_name(name)?;
    let mut rest = &line[end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            if let Some(after) = r.strip_prefix('}') {
                r = after;
                break;
            }
            let eq = r.find('=').ok_or("a label without '='")?;
            let label = &r[..eq];
            check_label_name(label)?;
            r = r[eq + 1..]
                .strip_prefix('"')
                .ok_or("an unquoted label value")?;
            let mut value = String::new();
            let mut chars = r.char_indices();
            let close = loop {
                match chars.next() {
                    None => return Err("an unterminated label value".into()),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => return Err("a bad escape in a label value".into()),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            if labels.insert(label.to_owned(), value).is_some() {
                return Err(format!("label {label:?} twice"));
            }
            r = &r[close + 1..];
            if let Some(after) = r.strip_prefix(',') {
                r = after;
            } else if !r.starts_with('}') {
                return Err("labels not separated by ','".into());
            }
        }
        rest = r;
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut parts = rest.split(' ');
    let value = parts.next().unwrap_or_default();
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse()
            .map_err(|_| format!("value {v:?} is not a number"))?,
    };
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("timestamp {ts:?} is not an integer"))?;
    }
    if parts.next().is_some() {
        return Err("trailing text".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The samples of an exposition as `name{labels}` → value, for quick lookups.
pub fn samples_by_series(samples: &[Sample]) -> BTreeMap<String, f64> {
    samples
        .iter()
        .map(|s| {
            let labels: Vec<String> = s
                .labels
                .iter()
                .filter(|(k, _)| k.as_str() != "device")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let key = if labels.is_empty() {
                s.name.clone()
            } else {
                format!("{}{{{}}}", s.name, labels.join(","))
            };
            (key, s.value)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_refuses_what_prometheus_would() {
        for bad in [
            "x 1\n",                                                    // no TYPE
            "# TYPE x gauge\nx 1",                                      // no final newline
            "# TYPE x gauge\n# TYPE x gauge\nx 1\n",                    // TYPE twice
            "# TYPE x gauge\nx{a=\"1} 1\n",                             // unterminated
            "# TYPE x gauge\nx{a=1} 1\n",                               // unquoted
            "# TYPE x gauge\nx one\n",                                  // not a number
            "# TYPE 1x gauge\n",                                        // bad name
            "# TYPE x gauge\n# TYPE y gauge\nx 1\ny 1\nx{a=\"b\"} 2\n", // split family
            "# TYPE x gauge\nx 1\nx 2\n",                               // duplicate series
            "# TYPE x gauges\n",                                        // unknown type
            "# TYPE x gauge\nx{a=\"\\t\"} 1\n",                         // bad escape
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        let ok = "# HELP x Help.\n# TYPE x counter\nx{a=\"1\",b=\"\\\"\"} 1.5 1700000000000\n";
        let s = parse(ok).unwrap();
        assert_eq!(s[0].label("b"), Some("\""));
        assert_eq!(s[0].value, 1.5);
    }
}
