//! Cuts a byte stream into whole MQTT packets, holding no more memory than the bytes that
//! actually arrived justify: a 5-byte header that claims a 256 MiB packet costs 64 bytes,
//! not 256 MiB, and is refused as soon as it is read when it is over the limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, BytesMut};

use super::PacketError;

/// An emptied buffer smaller than this is kept for the next bytes; a larger one is freed.
const KEEP_EMPTY: usize = 4096;

/// Bytes held by every framer together, for the broker's total memory bound.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Cuts a byte stream into whole MQTT packets.
///
/// The framer keeps the bytes that arrived and nothing more: [`push`](Self::push) grows
/// the buffer by what it is given (plus half of what is already held, so that a large
/// packet arriving in pieces is not copied over and over), whatever a packet header
/// claims. Its capacity never exceeds 1.5 times the most bytes it held, an emptied buffer
/// is given back, `max_packet` bounds one connection and the shared [`Budget`] bounds all
/// of them.
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    max_packet: usize,
    budget: Arc<Budget>,
    /// Capacity charged to the budget.
    charged: usize,
}

impl Framer {
    pub fn new(max_packet: usize, budget: Arc<Budget>) -> Self {
        Framer {
            buf: BytesMut::new(),
            max_packet,
            budget,
            charged: 0,
        }
    }

    /// Appends bytes that arrived.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), PacketError> {
        let held = self.buf.len();
        if self.buf.capacity() - held < bytes.len() {
            // Grown by hand, not by `reserve`: that may double a buffer whose front was
            // consumed long ago. Here the new size follows what is held now.
            let mut grown = BytesMut::with_capacity(held + held / 2 + bytes.len());
            grown.extend_from_slice(&self.buf);
            self.buf = grown;
            self.account()?;
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The whole packet at the front of the buffer, if it has arrived. A header that
    /// announces more than `max_packet` is an error at once, before its body arrives.
    pub fn peek(&self) -> Result<Option<&[u8]>, PacketError> {
        let Some(header) = Header::parse(&self.buf)? else {
            return Ok(None);
        };
        let total = header.total();
        if total > self.max_packet {
            return Err(PacketError::TooLarge {
                size: total,
                limit: self.max_packet,
            });
        }
        Ok(self.buf.get(..total))
    }

    /// Drops the first `len` bytes (the packet [`peek`](Self::peek) returned).
    pub fn consume(&mut self, len: usize) {
        self.buf.advance(len.min(self.buf.len()));
        // An idle connection gives back what a burst made it hold.
        if self.buf.is_empty() && self.buf.capacity() > KEEP_EMPTY {
            self.buf = BytesMut::new();
            let _ = self.account();
        }
    }

    /// Bytes of a packet that has not fully arrived.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The largest packet this framer takes (a reload may change it for new connections).
    pub fn set_max_packet(&mut self, max_packet: usize) {
        self.max_packet = max_packet;
    }

    fn account(&mut self) -> Result<(), PacketError> {
        let capacity = self.buf.capacity();
        if capacity > self.charged {
            if !self.budget.charge(capacity - self.charged) {
                return Err(PacketError::OverBudget);
            }
        } else {
            self.budget.release(self.charged - capacity);
        }
        self.charged = capacity;
        Ok(())
    }
}

impl Drop for Framer {
    fn drop(&mut self) {
        self.budget.release(self.charged);
    }
}

/// A packet's fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub flags: u8,
    /// Bytes of the fixed header (2 to 5).
    pub len: usize,
    /// Bytes after the fixed header.
    pub remaining: usize,
}

impl Header {
    /// The header at the start of `buf`; Ok(None) until all of it arrived.
    pub fn parse(buf: &[u8]) -> Result<Option<Header>, PacketError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let mut remaining = 0usize;
        for i in 0..4 {
            let Some(&b) = buf.get(1 + i) else {
                return Ok(None);
            };
            remaining |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                // A length in more bytes than needed ([MQTT-1.5.5-1]) is not refused: it
                // is unambiguous, and mosquitto takes it too.
                return Ok(Some(Header {
                    kind: first >> 4,
                    flags: first & 0x0F,
                    len: 2 + i,
                    remaining,
                }));
            }
        }
        Err(PacketError::BadLength)
    }

    pub fn total(&self) -> usize {
        self.len + self.remaining
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framer(max: usize) -> Framer {
        Framer::new(max, Budget::new(usize::MAX))
    }

    #[test]
    fn frames_are_cut_at_their_length() {
        let mut f = framer(1024);
        f.push(&[0xC0]).unwrap();
        assert_eq!(f.peek(), Ok(None));
        f.push(&[0x00, 0x30, 0x03, 1]).unwrap();
        assert_eq!(f.peek(), Ok(Some(&[0xC0, 0x00][..])));
        f.consume(2);
        assert_eq!(f.peek(), Ok(None));
        f.push(&[2, 3]).unwrap();
        assert_eq!(f.peek(), Ok(Some(&[0x30, 0x03, 1, 2, 3][..])));
        let mut f = framer(1024);
        f.push(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF]).unwrap();
        assert_eq!(f.peek(), Err(PacketError::BadLength));
    }

    #[test]
    fn a_huge_claim_costs_nothing_and_is_refused_at_once() {
        let mut f = framer(300 * 1024);
        f.push(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).unwrap();
        assert!(matches!(f.peek(), Err(PacketError::TooLarge { .. })));
        assert!(f.capacity() <= 8, "{}", f.capacity());
        let mut f = framer(300 * 1024);
        f.push(&[0x10, 0x80, 0x80, 0x10]).unwrap();
        assert_eq!(f.peek(), Ok(None));
        assert!(f.capacity() <= 6, "{}", f.capacity());
    }

    #[test]
    fn the_budget_bounds_all_framers_together() {
        let budget = Budget::new(1000);
        let mut framers: Vec<Framer> = (0..20)
            .map(|_| Framer::new(1 << 20, budget.clone()))
            .collect();
        let refused = framers
            .iter_mut()
            .filter_map(|f| f.push(&[0u8; 64]).err())
            .count();
        assert!(refused > 0 && budget.used() <= 1000);
        drop(framers);
        assert_eq!(budget.used(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes, in arbitrary read sizes: no panic, and the buffer never holds
        /// more than 1.5 times the most bytes that had arrived and were not consumed.
        #[test]
        fn the_framer_survives_anything(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40),
            max in 2usize..4096,
        ) {
            let mut f = framer(max);
            let mut peak_held = 0;
            'feed: for chunk in chunks {
                f.push(&chunk).unwrap();
                peak_held = peak_held.max(f.buffered());
                loop {
                    match f.peek() {
                        Ok(Some(frame)) => {
                            let len = frame.len();
                            prop_assert!(len <= max);
                            let _ = super::super::Packet::parse(frame, super::super::Protocol::V311);
                            let _ = super::super::Packet::parse(frame, super::super::Protocol::V5);
                            f.consume(len);
                        }
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                let bound = peak_held + peak_held / 2;
                prop_assert!(f.capacity() <= bound, "capacity {} > {bound}", f.capacity());
            }
        }
    }
}
