//! The reused read buffer.

/// A read buffer that is allocated once and reused. It grows (doubling) only when a single reply
/// unit does not fit, and never beyond `max`, which the driver sets to the largest unit the
/// parser can accept (maximum value size plus a reply line). The bytes are kept initialised so
/// reads need no `unsafe`.
#[derive(Debug)]
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max: usize,
    /// The size it takes when its connection opens (or on a first read): nothing is
    /// allocated before, since a client knows every server of its fleet and may talk to few
    /// of them (a shared client's per-server engines each talk to one).
    initial: usize,
}

impl ReadBuf {
    pub(crate) fn new(initial: usize, max: usize) -> ReadBuf {
        ReadBuf {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max,
            initial: initial.min(max),
        }
    }

    /// Allocates the buffer if it is not yet (a connection opens: it will read).
    pub(crate) fn ready(&mut self) {
        if self.buf.is_empty() && self.initial > 0 {
            self.buf.resize(self.initial, 0);
        }
    }

    /// The bytes received and not yet consumed.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks `n` bytes of [`data`](Self::data) as used.
    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    pub(crate) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Free space to read into, making room first by moving unconsumed bytes to the front or,
    /// if the buffer is all one unfinished unit, by growing it. `None` when the unit would
    /// exceed `max`: the parser let through something larger than it should have, so the caller
    /// treats the connection as broken rather than grow without bound.
    pub(crate) fn spare(&mut self) -> Option<&mut [u8]> {
        self.ready();
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < self.max {
                let grown = (self.buf.len() * 2).max(4096).min(self.max);
                self.buf.resize(grown, 0);
            } else {
                return None;
            }
        }
        Some(&mut self.buf[self.end..])
    }

    /// Records that `n` bytes were read into the slice [`spare`](Self::spare) returned.
    pub(crate) fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// Appends `bytes` as if read from a socket (tests driving an exchange in memory).
    #[cfg(test)]
    pub(crate) fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let spare = self.spare().expect("within the limit");
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            self.filled(n);
            bytes = &bytes[n..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ReadBuf;

    #[test]
    fn compacts_then_grows_up_to_max() {
        let mut b = ReadBuf::new(8, 20);
        let s = b.spare().unwrap();
        assert_eq!(s.len(), 8);
        s.copy_from_slice(b"abcdefgh");
        b.filled(8);
        b.consume(3);
        // Full at the end: unconsumed bytes move to the front.
        assert_eq!(b.spare().unwrap().len(), 3);
        assert_eq!(b.data(), b"defgh");
        b.filled(3);
        // Full and all unconsumed: grow, capped at max.
        assert_eq!(b.spare().unwrap().len(), 12);
        b.filled(12);
        assert_eq!(b.data().len(), 20);
        assert!(b.spare().is_none());
        b.consume(20);
        assert!(b.is_empty());
        assert_eq!(b.spare().unwrap().len(), 20);
    }
}
