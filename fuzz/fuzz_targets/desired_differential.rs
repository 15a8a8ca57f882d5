//! Differential: one generated desired document, written both as JSON text and as CBOR,
//! must decode to the same document (or be refused for the same reason) either way.
//!
//! Generated trees hold only what both encodings can say: text keys (duplicates included),
//! null, booleans, 64-bit integers, finite decimals and nesting up to 40 levels (below
//! both parsers' recursion limits). The size limit is off: it applies to the payload as
//! received, so it differs between encodings by design.
#![no_main]

use ciborium::Value as Cbor;
use edgesync::codec::doc::{self, Limits};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const MAX_NESTING: u32 = 40;
/// Exact powers of ten: `m / 10^e` is then one correctly rounded division, the same value
/// a correct JSON parser gives for the text `{m}e-{e}`.
const POW10: [f64; 11] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];
const NAMES: [&str; 8] = ["version", "ts", "state", "led.mode", "a", "x-1", "", "é"];

#[derive(Debug)]
enum Node {
    Null,
    Bool(bool),
    UInt(u64),
    Int(i64),
    Decimal(i32, usize),
    Text(String),
    Array(Vec<Node>),
    Map(Vec<(String, Node)>),
}

fn name(u: &mut Unstructured) -> Result<String> {
    Ok(if u.ratio(3, 4)? {
        (*u.choose(&NAMES)?).to_owned()
    } else {
        u.arbitrary()?
    })
}

fn node(u: &mut Unstructured, depth: u32) -> Result<Node> {
    let containers = depth < MAX_NESTING;
    Ok(match u.int_in_range(0..=if containers { 7 } else { 5 })? {
        0 => Node::Null,
        1 => Node::Bool(u.arbitrary()?),
        2 => Node::UInt(u.arbitrary()?),
        3 => Node::Int(u.arbitrary()?),
        4 => Node::Decimal(u.arbitrary()?, u.int_in_range(0..=10)?),
        5 => Node::Text(u.arbitrary()?),
        6 => {
            let n = u.int_in_range(0..=4)?;
            Node::Array((0..n).map(|_| node(u, depth + 1)).collect::<Result<_>>()?)
        }
        _ => Node::Map(map(u, depth)?),
    })
}

fn map(u: &mut Unstructured, depth: u32) -> Result<Vec<(String, Node)>> {
    let n = u.int_in_range(0..=4)?;
    (0..n)
        .map(|_| Ok((name(u)?, node(u, depth + 1)?)))
        .collect()
}

/// A document, mostly well formed: top-level fields in any order, maybe repeated.
fn document(u: &mut Unstructured) -> Result<Node> {
    let mut fields = Vec::new();
    for _ in 0..u.int_in_range(0..=5)? {
        let field = name(u)?;
        let value = match (field.as_str(), u.ratio(7, 8)?) {
            ("version" | "ts", true) => Node::UInt(u.int_in_range(0..=1000)?),
            ("state", true) => Node::Map(map(u, 0)?),
            _ => node(u, 0)?,
        };
        fields.push((field, value));
    }
    Ok(Node::Map(fields))
}

fn json(n: &Node, out: &mut String) {
    use std::fmt::Write;
    match n {
        Node::Null => out.push_str("null"),
        Node::Bool(b) => write!(out, "{b}").unwrap(),
        Node::UInt(v) => write!(out, "{v}").unwrap(),
        Node::Int(v) => write!(out, "{v}").unwrap(),
        Node::Decimal(m, e) => write!(out, "{m}e-{e}").unwrap(),
        Node::Text(s) => out.push_str(&serde_json::to_string(s).unwrap()),
        Node::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                json(x, out);
            }
            out.push(']');
        }
        Node::Map(entries) => {
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push(':');
                json(v, out);
            }
            out.push('}');
        }
    }
}

fn cbor(n: &Node) -> Cbor {
    match n {
        Node::Null => Cbor::Null,
        Node::Bool(b) => Cbor::Bool(*b),
        Node::UInt(v) => Cbor::Integer((*v).into()),
        Node::Int(v) => Cbor::Integer((*v).into()),
        Node::Decimal(m, e) => Cbor::Float(f64::from(*m) / POW10[*e]),
        Node::Text(s) => Cbor::Text(s.clone()),
        Node::Array(items) => Cbor::Array(items.iter().map(cbor).collect()),
        Node::Map(entries) => Cbor::Map(
            entries
                .iter()
                .map(|(k, v)| (Cbor::Text(k.clone()), cbor(v)))
                .collect(),
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(d) = document(&mut u) else {
        return;
    };
    let mut text = String::new();
    json(&d, &mut text);
    let mut bin = Vec::new();
    ciborium::into_writer(&cbor(&d), &mut bin).unwrap();
    let limits = Limits {
        max_bytes: usize::MAX,
        max_depth: 16,
    };
    let from_json = doc::decode(text.as_bytes(), limits);
    let from_cbor = doc::decode(&bin, limits);
    match (from_json, from_cbor) {
        (Ok(j), Ok(c)) => {
            assert_eq!((j.version, j.ts), (c.version, c.ts), "{text}");
            assert_eq!(j.state, c.state, "{text}");
        }
        (Err(j), Err(c)) => {
            assert_eq!((j.version, &j.reason), (c.version, &c.reason), "{text}");
        }
        (j, c) => panic!("JSON and CBOR disagree on {text}:\n json: {j:?}\n cbor: {c:?}"),
    }
});
