//! Layer 0: the vocabulary every other layer shares, with no I/O and no dependency on any
//! other module of the crate: a reported change and its key and value rules, the topic
//! names, key globs, desired value rules, command names and small text helpers.

pub mod change;
pub mod command;
pub mod compress;
pub mod doc;
pub mod glob;
pub mod rules;
pub mod source;
pub mod text;
pub mod topics;
