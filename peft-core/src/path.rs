//! Dotted module paths (`layers.0.self_attn.q_proj`), built while visiting.

use std::fmt;

/// The dotted path of the module being visited, as PEFT and checkpoints name it.
///
/// Visitors receive it by reference; containers push a segment before visiting a
/// child and pop it afterwards, so the buffer is reused for the whole walk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModulePath {
    buf: String,
    /// Length of `buf` before each pushed segment, to pop in O(1).
    marks: Vec<usize>,
}

impl ModulePath {
    /// An empty path: the root of the model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a segment (`q_proj`).
    pub fn push(&mut self, segment: &str) {
        self.start_segment();
        self.buf.push_str(segment);
    }

    /// Appends a numeric segment (the index in a `Vec` or array).
    pub fn push_index(&mut self, index: usize) {
        use fmt::Write;
        self.start_segment();
        // Writing to a String cannot fail.
        let _ = write!(self.buf, "{index}");
    }

    /// Removes the last pushed segment; does nothing at the root.
    pub fn pop(&mut self) {
        if let Some(mark) = self.marks.pop() {
            self.buf.truncate(mark);
        }
    }

    /// The path as text; empty at the root.
    pub fn as_str(&self) -> &str {
        &self.buf
    }

    /// Whether this is the root (no segment pushed).
    pub fn is_root(&self) -> bool {
        self.marks.is_empty()
    }

    /// How many segments have been pushed.
    pub fn depth(&self) -> usize {
        self.marks.len()
    }

    fn start_segment(&mut self) {
        self.marks.push(self.buf.len());
        if !self.buf.is_empty() {
            self.buf.push('.');
        }
    }
}

impl fmt::Display for ModulePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.buf)
    }
}

impl AsRef<str> for ModulePath {
    fn as_ref(&self) -> &str {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::ModulePath;

    #[test]
    fn push_and_pop_segments() {
        let mut path = ModulePath::new();
        assert!(path.is_root());
        path.push("layers");
        path.push_index(12);
        path.push("q_proj");
        assert_eq!(path.as_str(), "layers.12.q_proj");
        assert_eq!(path.depth(), 3);
        path.pop();
        assert_eq!(path.as_str(), "layers.12");
        path.pop();
        path.pop();
        path.pop();
        assert_eq!(path.as_str(), "");
        assert!(path.is_root());
    }
}
