//! Parsed GraphQL documents, kept by their text: clients send the same few operations over and
//! over (a run's start and its approvals are four requests of two texts), and parsing one was
//! ~5 % of the server's instructions per run (BENCHMARKS.md). A request whose text was parsed
//! before gets a copy of that document; async-graphql still checks its depth, directives,
//! complexity and validity against the schema at every execution, as for a fresh parse.

use async_graphql::parser::types::ExecutableDocument;
use async_graphql::Request;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Most documents kept; when full, the cache starts over (a client that sends a new text each
/// time costs one parse per request, as without a cache, and never more memory than this).
pub const MAX_DOCUMENTS: usize = 256;
/// Longer texts are parsed each time and not kept.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

#[derive(Default)]
pub struct ParsedDocuments {
    docs: Mutex<HashMap<Box<str>, ExecutableDocument>>,
    hits: AtomicU64,
}

impl ParsedDocuments {
    /// Give `req` its parsed document: a copy of the kept one, or a fresh parse that is kept
    /// for the next request with the same text. A text that does not parse is not kept; its
    /// request goes on unparsed and gets async-graphql's own syntax error.
    pub fn prepare(&self, mut req: Request) -> Request {
        if req.query.len() > MAX_TEXT_BYTES {
            return req;
        }
        let kept = crate::sync::lock(&self.docs)
            .get(req.query.as_str())
            .cloned();
        if let Some(doc) = kept {
            self.hits.fetch_add(1, Ordering::Relaxed);
            req.set_parsed_query(doc);
            return req;
        }
        let Ok(doc) = req.parsed_query().cloned() else {
            return req;
        };
        let mut docs = crate::sync::lock(&self.docs);
        if docs.len() >= MAX_DOCUMENTS {
            docs.clear();
        }
        docs.insert(req.query.as_str().into(), doc);
        req
    }

    /// Requests that were given a kept document.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Documents kept now.
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.docs).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_documents_are_bounded() {
        let docs = ParsedDocuments::default();
        for i in 0..MAX_DOCUMENTS {
            docs.prepare(Request::new(format!("{{ a{i} }}")));
        }
        assert_eq!(docs.len(), MAX_DOCUMENTS);
        // Full: it starts over with the new text.
        docs.prepare(Request::new("{ b }"));
        assert_eq!(docs.len(), 1);
        docs.prepare(Request::new("{ b }"));
        assert_eq!(docs.hits(), 1);
        // Long texts and texts that do not parse are not kept.
        let long = format!("{{ a{} }}", "b".repeat(MAX_TEXT_BYTES));
        let mut req = docs.prepare(Request::new(long));
        assert!(
            req.parsed_query().is_ok(),
            "still parsed by the request itself"
        );
        docs.prepare(Request::new("{ b"));
        assert_eq!(docs.len(), 1);
    }
}
