//! A round in memory: queued requests in, one request per batch out, a hand-written server
//! reply fed back split at every byte boundary, each slot's result checked.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ArenaKeys, OnHit, OnItem, Slots, Transport, Work, Writes};
use crate::client::ItemRef;
use crate::conn::batch::BatchPolicy;
use crate::conn::exchange_for_fuzzing::{Exchange, Failure, ReadBuf};
use crate::engine::batch::for_fuzzing::OneServer;
use crate::engine::batch::{ChainItems, Part};
use crate::error::{Error, Result};
use crate::proto::wire::{with_wire, Cmd, GetOpts, Kind, Outcome, StoreOpts};
use crate::proto::{ParseError, Protocol, SetOutcome, Status, StoreMode};
use crate::shared::engine::{Op, Reply, Req};
use crate::ItemInfo;

const LABEL: &str = "memory:11211";

/// A server in memory: each batch's request is kept, and answered with the next of
/// `replies`, delivered in two reads split at `split` (clamped to the reply's length).
struct MemoryServer {
    protocol: Protocol,
    replies: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
    split: usize,
}

impl MemoryServer {
    fn new(protocol: Protocol, replies: &[&[u8]], split: usize) -> MemoryServer {
        MemoryServer {
            protocol,
            replies: replies.iter().map(|r| r.to_vec()).collect(),
            sent: Vec::new(),
            split,
        }
    }

    /// Feeds the next reply to `read` as the driver does (through [`Exchange`] and a
    /// [`ReadBuf`]), in two reads; the end of the bytes before the batch is complete is the
    /// server closing the connection.
    fn answer(
        &mut self,
        mut read: impl FnMut(&[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    ) -> Result<()> {
        let reply = self.replies.pop_front().unwrap_or_default();
        let at = self.split.min(reply.len());
        let mut ex = Exchange::new(0, None, Instant::now() + Duration::from_secs(60));
        let mut rbuf = ReadBuf::new(8, 1 << 20);
        for part in [&reply[..at], &reply[at..]] {
            if part.is_empty() {
                continue;
            }
            rbuf.push(part);
            ex.handle_input(&mut rbuf, &mut read).map_err(failed)?;
            if ex.is_done() {
                return Ok(());
            }
        }
        Err(failed(ex.handle_eof()))
    }
}

/// The error the driver reports for a failed exchange.
fn failed(f: Failure) -> Error {
    match f {
        Failure::Parse(error) => Error::Parse {
            server: LABEL.into(),
            error,
        },
        Failure::Closed => Error::Io {
            server: LABEL.into(),
            source: Arc::new(std::io::ErrorKind::UnexpectedEof.into()),
        },
        other => panic!("no clock and no writes here: {other:?}"),
    }
}

impl Transport for MemoryServer {
    fn policy(&self) -> BatchPolicy {
        BatchPolicy::round(false, 0)
    }

    fn get(&mut self, cas: bool, keys: &ArenaKeys<'_>, mut on_hit: OnHit<'_>) -> Result<()> {
        let mut one = OneServer::new(Kind::Get, keys.keys.len());
        let mut out = Vec::new();
        let opts = GetOpts {
            cas,
            ..GetOpts::default()
        };
        with_wire!(self.protocol, W => {
            one.encode_items::<W>(&mut out, keys, |_| None, |_, key| Cmd::Get(key, opts));
            self.sent.push(out);
            let mut none = |_: usize, _: Outcome<'_>| Err(ParseError::Unexpected);
            self.answer(|buf| one.read_answers::<W>(keys, buf, &mut on_hit, &mut none))
        })
    }

    fn write(&mut self, kind: Kind, w: &Writes<'_>, mut on_item: OnItem<'_>) -> Result<()> {
        let mut one = OneServer::new(kind, w.keys.keys.len());
        let mut out = Vec::new();
        with_wire!(self.protocol, W => {
            one.encode_items::<W>(&mut out, &w.keys, |j| w.value(j), |j, key| w.cmd(j, key));
            self.sent.push(out);
            let mut no_hit = |_: usize, _: ItemRef<'_>| unreachable!("no hits in a write batch");
            let r = self.answer(|buf| one.read_answers::<W>(&w.keys, buf, &mut no_hit, &mut on_item));
            if one.refused() {
                return Err(Error::Parse { server: LABEL.into(), error: ParseError::Unexpected });
            }
            r
        })
    }

    fn single(&mut self, op: Op, _: &[u8], _: &[u8], _: &mut Vec<u8>) -> Result<Reply> {
        panic!("these rounds batch everything: {op:?} was sent alone")
    }

    /// One batch per exchange here (the chained rounds are tested against memcached).
    fn chain(&mut self, _: &mut [Part<'_>], _: &mut ChainItems<'_>) -> bool {
        false
    }
}

/// A slot's result and a hit's value, once completed.
type Got = Option<(Result<Reply>, Option<Vec<u8>>)>;

/// What each slot got, exactly once.
#[derive(Default)]
struct Record {
    got: RefCell<Vec<Got>>,
}

impl Slots for Record {
    fn complete(&self, slot: u32, r: Result<Reply>, v: Option<&[u8]>, _: &mut Vec<u32>) {
        let mut got = self.got.borrow_mut();
        let at = slot as usize;
        if got.len() <= at {
            got.resize_with(at + 1, || None);
        }
        assert!(got[at].is_none(), "slot {slot} completed twice");
        got[at] = Some((r, v.map(<[u8]>::to_vec)));
    }
    fn wake_round(&self) {}
    fn label(&self) -> &str {
        LABEL
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// A round's queue, as the engine swaps it out: requests in slots 0, 1, 2, ... in order.
fn queued(calls: &[(Op, &str, &str)]) -> Work {
    let mut work = Work::default();
    let deadline = Instant::now() + Duration::from_secs(3600);
    for (slot, &(op, key, value)) in calls.iter().enumerate() {
        let k = work.arena.len();
        work.arena.extend_from_slice(key.as_bytes());
        let v = work.arena.len();
        work.arena.extend_from_slice(value.as_bytes());
        work.reqs.push(Req {
            op,
            key: k..v,
            value: v..work.arena.len(),
            slot: slot as u32,
            deadline,
        });
    }
    work
}

fn set(mode: StoreMode) -> Op {
    Op::Store(StoreOpts {
        mode,
        ..StoreOpts::default()
    })
}

const GET: Op = Op::Get { cas: false };
const GETS: Op = Op::Get { cas: true };

/// Gets (a duplicate key, a miss), stores (one not stored) and deletes (one of a missing
/// key), interleaved as concurrent callers queue them.
fn mixed() -> Vec<(Op, &'static str, &'static str)> {
    vec![
        (GET, "alpha", ""),
        (set(StoreMode::Set), "alpha", "new"),
        (GET, "beta", ""),
        (Op::Delete, "gamma", ""),
        (GETS, "alpha", ""),
        (set(StoreMode::Add), "delta", "d"),
        (GET, "gamma", ""),
        (Op::Delete, "zeta", ""),
        (set(StoreMode::Set), "eps", "e"),
    ]
}

/// What each slot of [`mixed`] must get (a hit's value second).
fn mixed_expected() -> Vec<(Reply, Option<&'static [u8]>)> {
    let hit = |flags, cas| Reply::Hit(ItemInfo { flags, cas });
    vec![
        (hit(5, None), Some(b"A1")),
        (Reply::Store(SetOutcome::Stored), None),
        (Reply::Miss, None),
        (Reply::Existed(true), None),
        (hit(5, Some(77)), Some(b"A1")),
        (Reply::Store(SetOutcome::NotStored), None),
        (hit(0, None), Some(b"G")),
        (Reply::Existed(false), None),
        (Reply::Store(SetOutcome::Stored), None),
    ]
}

/// Runs one round of `calls` against `replies` (one per batch: gets, stores, deletes), with
/// every reply split at `split`.
fn round(
    protocol: Protocol,
    calls: &[(Op, &str, &str)],
    replies: &[&[u8]],
    split: usize,
) -> (Vec<Got>, MemoryServer) {
    let mut work = queued(calls);
    let mut server = MemoryServer::new(protocol, replies, split);
    let record = Record::default();
    work.serve(&record, &mut server);
    (record.got.into_inner(), server)
}

/// Every split of every reply: each slot gets exactly its own reply.
fn check_mixed(protocol: Protocol, requests: [&[u8]; 3], replies: [&[u8]; 3]) {
    let longest = replies.iter().map(|r| r.len()).max().unwrap_or(0);
    for split in 0..=longest {
        let (got, server) = round(protocol, &mixed(), &replies, split);
        let sent: Vec<&[u8]> = server.sent.iter().map(Vec::as_slice).collect();
        assert_eq!(sent, requests, "{protocol:?}: the batches' requests");
        assert_eq!(
            got.len(),
            mixed().len(),
            "{protocol:?}: every slot answered"
        );
        for (slot, (got, want)) in got.into_iter().zip(mixed_expected()).enumerate() {
            let (result, value) = got.unwrap_or_else(|| panic!("slot {slot} not completed"));
            let reply = result.unwrap_or_else(|e| panic!("{protocol:?} split {split}: {e}"));
            assert_eq!(reply, want.0, "{protocol:?} split {split}: slot {slot}");
            assert_eq!(
                value.as_deref(),
                want.1,
                "{protocol:?} split {split}: slot {slot}"
            );
        }
    }
}

#[test]
fn text_round_answers_each_slot() {
    check_mixed(
        Protocol::Text,
        [
            b"gets alpha beta gamma\r\n",
            b"set alpha 0 0 3\r\nnew\r\nadd delta 0 0 1\r\nd\r\nset eps 0 0 1\r\ne\r\n",
            b"delete gamma\r\ndelete zeta\r\n",
        ],
        [
            b"VALUE alpha 5 2 77\r\nA1\r\nVALUE gamma 0 1 78\r\nG\r\nEND\r\n",
            b"STORED\r\nNOT_STORED\r\nSTORED\r\n",
            b"DELETED\r\nNOT_FOUND\r\n",
        ],
    );
}

/// A binary packet: request (magic 0x80) or response (0x81), as memcached frames them.
#[allow(clippy::too_many_arguments)]
fn packet(
    magic: u8,
    opcode: u8,
    status: u16,
    opaque: u32,
    cas: u64,
    extras: &[u8],
    key: &[u8],
    value: &[u8],
) -> Vec<u8> {
    let mut p = vec![magic, opcode];
    p.extend_from_slice(&(key.len() as u16).to_be_bytes());
    p.push(extras.len() as u8);
    p.push(0);
    p.extend_from_slice(&status.to_be_bytes());
    let body = extras.len() + key.len() + value.len();
    p.extend_from_slice(&(body as u32).to_be_bytes());
    p.extend_from_slice(&opaque.to_be_bytes());
    p.extend_from_slice(&cas.to_be_bytes());
    p.extend_from_slice(extras);
    p.extend_from_slice(key);
    p.extend_from_slice(value);
    p
}

fn request(opcode: u8, opaque: u32, extras: &[u8], key: &str, value: &str) -> Vec<u8> {
    packet(
        0x80,
        opcode,
        0,
        opaque,
        0,
        extras,
        key.as_bytes(),
        value.as_bytes(),
    )
}

fn response(
    opcode: u8,
    status: u16,
    opaque: u32,
    cas: u64,
    extras: &[u8],
    key: &str,
    value: &str,
) -> Vec<u8> {
    packet(
        0x81,
        opcode,
        status,
        opaque,
        cas,
        extras,
        key.as_bytes(),
        value.as_bytes(),
    )
}

const NOOP: u8 = 0x0a;
const SYNC: u32 = u32::MAX;

/// A binary hit answering a quiet get-with-key.
fn bin_hit(opaque: u32, cas: u64, flags: u32, key: &str, value: &str) -> Vec<u8> {
    response(0x0d, 0, opaque, cas, &flags.to_be_bytes(), key, value)
}

fn bin_noop() -> Vec<u8> {
    response(NOOP, 0, SYNC, 0, &[], "", "")
}

#[test]
fn binary_round_answers_each_slot() {
    let (getkq, setq, addq, deleteq) = (0x0d, 0x11, 0x12, 0x14);
    let noop = packet(0x80, NOOP, 0, SYNC, 0, &[], b"", b"");
    let gets = [
        request(getkq, 0, &[], "alpha", ""),
        request(getkq, 1, &[], "beta", ""),
        request(getkq, 2, &[], "gamma", ""),
        noop.clone(),
    ]
    .concat();
    let stores = [
        request(setq, 0, &[0; 8], "alpha", "new"),
        request(addq, 1, &[0; 8], "delta", "d"),
        request(setq, 2, &[0; 8], "eps", "e"),
        noop.clone(),
    ]
    .concat();
    let deletes = [
        request(deleteq, 0, &[], "gamma", ""),
        request(deleteq, 1, &[], "zeta", ""),
        noop,
    ]
    .concat();
    // Quiet commands: only the hits and the failures answer, then the no-op.
    let got = [
        bin_hit(0, 77, 5, "alpha", "A1"),
        bin_hit(2, 78, 0, "gamma", "G"),
        bin_noop(),
    ]
    .concat();
    let stored = [
        response(addq, 0x0002, 1, 0, &[], "", "Data exists for key."),
        bin_noop(),
    ]
    .concat();
    let deleted = [
        response(deleteq, 0x0001, 1, 0, &[], "", "Not found"),
        bin_noop(),
    ]
    .concat();
    check_mixed(
        Protocol::Binary,
        [&gets, &stores, &deletes],
        [&got, &stored, &deleted],
    );
}

#[test]
fn meta_round_answers_each_slot() {
    check_mixed(
        Protocol::Meta,
        [
            b"mg alpha v c f O0 q\r\nmg beta v c f O1 q\r\nmg gamma v c f O2 q\r\nmn\r\n",
            b"ms alpha 3 O0 q\r\nnew\r\nms delta 1 ME O1 q\r\nd\r\nms eps 1 O2 q\r\ne\r\nmn\r\n",
            b"md gamma O0 q\r\nmd zeta O1 q\r\nmn\r\n",
        ],
        [
            b"VA 2 c77 f5 O0\r\nA1\r\nVA 1 c78 f0 O2\r\nG\r\nMN\r\n",
            b"NS O1\r\nMN\r\n",
            b"NF O1\r\nMN\r\n",
        ],
    );
}

/// Two gets (`alpha`, then `beta`) answered by `reply`, split everywhere: each slot gets its
/// own value (`alpha` → "A", `beta` → "B") or an error of `kind`, never the other's value.
/// Returns, per split, which slots got their value.
fn two_gets(protocol: Protocol, reply: &[u8], kind: crate::ErrorKind) -> Vec<[bool; 2]> {
    let calls = [(GET, "alpha", ""), (GET, "beta", "")];
    let own: [&[u8]; 2] = [b"A", b"B"];
    (0..=reply.len())
        .map(|split| {
            let (got, _) = round(protocol, &calls, &[reply], split);
            let mut hits = [false; 2];
            for (slot, got) in got.into_iter().enumerate() {
                match got.expect("every slot completed") {
                    (Ok(Reply::Hit(_)), Some(v)) => {
                        assert_eq!(v, own[slot], "{protocol:?} split {split}: slot {slot}");
                        hits[slot] = true;
                    }
                    (Ok(other), _) => panic!("{protocol:?} split {split}: slot {slot}: {other:?}"),
                    (Err(e), _) => assert_eq!(e.kind(), kind, "{protocol:?} split {split}: {e}"),
                }
            }
            hits
        })
        .collect()
}

#[test]
fn a_reply_for_a_key_not_asked_is_a_framing_error() {
    use crate::ErrorKind::Parse;
    // Text: a key not asked for, then the keys out of request order.
    let stranger = two_gets(Protocol::Text, b"VALUE omega 0 1\r\nX\r\nEND\r\n", Parse);
    assert!(stranger.iter().all(|h| h == &[false, false]));
    let swapped = b"VALUE beta 0 1\r\nB\r\nVALUE alpha 0 1\r\nA\r\nEND\r\n";
    assert!(two_gets(Protocol::Text, swapped, Parse)
        .iter()
        .all(|h| h == &[false, true]));
    // Binary: an opaque not in the batch, and an opaque naming one key with another's key.
    let stray = [bin_hit(7, 1, 0, "alpha", "A"), bin_noop()].concat();
    assert!(two_gets(Protocol::Binary, &stray, Parse)
        .iter()
        .all(|h| h == &[false, false]));
    let crossed = [bin_hit(1, 1, 0, "alpha", "A"), bin_noop()].concat();
    assert!(two_gets(Protocol::Binary, &crossed, Parse)
        .iter()
        .all(|h| h == &[false, false]));
    // Meta: an opaque not in the batch; then one answered twice.
    let meta = b"VA 1 f0 O5\r\nX\r\nMN\r\n";
    assert!(two_gets(Protocol::Meta, meta, Parse)
        .iter()
        .all(|h| h == &[false, false]));
    let twice = b"VA 1 f0 O1\r\nB\r\nVA 1 f0 O1\r\nB\r\nMN\r\n";
    assert!(two_gets(Protocol::Meta, twice, Parse)
        .iter()
        .all(|h| h == &[false, true]));
}

#[test]
fn a_missing_reply_fails_the_unanswered_slots_and_the_rest_of_the_round() {
    use crate::ErrorKind::Io;
    // The batch's end never comes (the server closed): the hit that came is delivered,
    // the other key is not taken for a miss.
    let cases: [(Protocol, Vec<u8>); 3] = [
        (Protocol::Text, b"VALUE alpha 0 1\r\nA\r\n".to_vec()),
        (Protocol::Binary, bin_hit(0, 1, 0, "alpha", "A")),
        (Protocol::Meta, b"VA 1 f0 O0\r\nA\r\n".to_vec()),
    ];
    for (protocol, reply) in &cases {
        let hits = two_gets(*protocol, reply, Io);
        assert_eq!(hits.last(), Some(&[true, false]), "{protocol:?}");
        assert!(
            hits.iter().all(|h| !h[1]),
            "{protocol:?}: beta never a miss or a hit"
        );
        // A transport failure fails the rest of the round without sending it.
        let (got, server) = round(*protocol, &mixed(), &[reply], reply.len());
        assert_eq!(server.sent.len(), 1, "{protocol:?}: stores not sent");
        for slot in [1, 3, 5, 7, 8] {
            let (r, _) = got[slot].as_ref().expect("completed");
            assert_eq!(
                r.as_ref().map_err(Error::kind).err(),
                Some(Io),
                "slot {slot}"
            );
        }
    }
}

const TOUCH: Op = Op::Touch(60);

/// Touches (one of a missing key) and incrs and decrs (one of a missing key, one of a value
/// that is not a number), as concurrent callers queue them.
fn counters() -> Vec<(Op, &'static str, &'static str)> {
    let arith = |decr, delta| Op::Arith { decr, delta };
    vec![
        (TOUCH, "alpha", ""),
        (arith(false, 5), "ctr", ""),
        (TOUCH, "gone", ""),
        (arith(true, 1), "word", ""),
        (arith(false, 1), "none", ""),
    ]
}

/// One batch of touches and one of incrs and decrs, whatever the split: each slot gets its
/// own answer, and the error of the incr of a word fails that call alone.
fn check_counters(protocol: Protocol, requests: [&[u8]; 2], replies: [&[u8]; 2]) {
    let longest = replies.iter().map(|r| r.len()).max().unwrap_or(0);
    for split in 0..=longest {
        let (got, server) = round(protocol, &counters(), &replies, split);
        let sent: Vec<&[u8]> = server.sent.iter().map(Vec::as_slice).collect();
        assert_eq!(sent, requests, "{protocol:?}: the batches' requests");
        let got: Vec<_> = (got.into_iter())
            .map(|g| g.expect("every slot completed").0)
            .collect();
        let ok = |slot: usize| got[slot].as_ref().ok().copied();
        let at = |slot| format!("{protocol:?} split {split}: slot {slot}");
        assert_eq!(ok(0), Some(Reply::Existed(true)), "{}", at(0));
        assert_eq!(ok(1), Some(Reply::Number(Some(7))), "{}", at(1));
        assert_eq!(ok(2), Some(Reply::Existed(false)), "{}", at(2));
        let e = got[3].as_ref().expect_err("a word is not a number");
        assert_eq!(e.kind(), crate::ErrorKind::Server, "{}: {e}", at(3));
        let text = e.to_string().to_lowercase();
        assert!(text.contains("non-numeric"), "{}: {e}", at(3));
        assert_eq!(ok(4), Some(Reply::Number(None)), "{}", at(4));
    }
}

#[test]
fn text_touches_and_incrs_are_batched() {
    check_counters(
        Protocol::Text,
        [
            b"touch alpha 60\r\ntouch gone 60\r\n",
            b"incr ctr 5\r\ndecr word 1\r\nincr none 1\r\n",
        ],
        [
            b"TOUCHED\r\nNOT_FOUND\r\n",
            b"7\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\nNOT_FOUND\r\n",
        ],
    );
}

#[test]
fn binary_touches_and_incrs_are_batched() {
    let (incr, decr, touch) = (0x05, 0x06, 0x1c);
    let noop = packet(0x80, NOOP, 0, SYNC, 0, &[], b"", b"");
    let ttl = 60u32.to_be_bytes();
    let arith = |delta: u64| {
        let mut e = delta.to_be_bytes().to_vec();
        e.extend_from_slice(&[0; 8]);
        e.extend_from_slice(&u32::MAX.to_be_bytes());
        e
    };
    let touches = [
        request(touch, 0, &ttl, "alpha", ""),
        request(touch, 1, &ttl, "gone", ""),
        noop.clone(),
    ]
    .concat();
    let incrs = [
        request(incr, 0, &arith(5), "ctr", ""),
        request(decr, 1, &arith(1), "word", ""),
        request(incr, 2, &arith(1), "none", ""),
        noop,
    ]
    .concat();
    let touched = [
        response(touch, 0, 0, 9, &[], "", ""),
        response(touch, 0x0001, 1, 0, &[], "", "Not found"),
        bin_noop(),
    ]
    .concat();
    let counted = [
        packet(0x81, incr, 0, 0, 9, &[], b"", &7u64.to_be_bytes()),
        response(
            decr,
            0x0006,
            1,
            0,
            &[],
            "",
            "Non-numeric server-side value for incr or decr",
        ),
        response(incr, 0x0001, 2, 0, &[], "", "Not found"),
        bin_noop(),
    ]
    .concat();
    check_counters(Protocol::Binary, [&touches, &incrs], [&touched, &counted]);
}

#[test]
fn meta_touches_and_incrs_are_batched() {
    // The word's error line names no request: every item of the batch answers in order, so
    // it answers the second.
    check_counters(
        Protocol::Meta,
        [
            b"mg alpha T60 O0\r\nmg gone T60 O1\r\nmn\r\n",
            b"ma ctr D5 v O0\r\nma word MD v O1\r\nma none v O2\r\nmn\r\n",
        ],
        [
            b"HD O0\r\nEN O1\r\nMN\r\n",
            b"VA 1 O0\r\n7\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\nNF O2\r\nMN\r\n",
        ],
    );
}

/// A touch batch answered out of order, or closed before every touch answered: the items
/// not answered in step fail (a framing error, or the connection's end), none gets another's
/// answer.
#[test]
fn a_touch_batch_out_of_step_fails_its_unanswered_items() {
    let calls = [(TOUCH, "alpha", ""), (TOUCH, "gone", "")];
    let cases: [(&[u8], crate::ErrorKind); 3] = [
        // The second item's answer first, then the first's: the first's is refused.
        (b"EN O1\r\nHD O0\r\nMN\r\n", crate::ErrorKind::Parse),
        // The batch's end before the second item's answer.
        (b"HD O0\r\nMN\r\n", crate::ErrorKind::Io),
        // An answer for an item not in the batch.
        (b"HD O0\r\nHD O7\r\nMN\r\n", crate::ErrorKind::Parse),
    ];
    for (reply, kind) in cases {
        for split in 0..=reply.len() {
            let (got, _) = round(Protocol::Meta, &calls, &[reply], split);
            let got: Vec<_> = (got.into_iter())
                .map(|g| g.expect("every slot completed").0)
                .collect();
            let what = String::from_utf8_lossy(reply);
            // "alpha" is answered by O0 or fails; "gone" never takes alpha's answer.
            match &got[0] {
                Ok(r) => assert_eq!(*r, Reply::Existed(true), "{what} split {split}"),
                Err(e) => assert_eq!(e.kind(), kind, "{what} split {split}: {e}"),
            }
            match &got[1] {
                Ok(r) => assert_eq!(*r, Reply::Existed(false), "{what} split {split}"),
                Err(e) => assert_eq!(e.kind(), kind, "{what} split {split}: {e}"),
            }
            assert!(got.iter().any(Result::is_err), "{what} split {split}");
        }
    }
}

/// Pipelined rounds in memory: two rounds' chains written back to back, their replies read
/// from one stream by the client's chain reader, interrupted at every byte (a fresh
/// exchange resumes each read, as after the driver's waker) and at every round boundary.
mod pipelined {
    use super::*;
    use crate::engine::batch::for_fuzzing::OneChain;
    use crate::engine::batch::Keys;
    use crate::proto::Key;

    struct Ks(Vec<Vec<u8>>);

    impl Keys for Ks {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn key(&self, j: usize) -> &[u8] {
            &self.0[j]
        }
    }

    fn ks(keys: &[&str]) -> Ks {
        Ks(keys.iter().map(|k| k.as_bytes().to_vec()).collect())
    }

    /// What a chain's replies delivered: `(part, item, outcome)`, a hit as `Hit(value)`.
    type Seen = Vec<(usize, usize, String)>;

    /// A round: its parts' kinds and keys, stores' values, and each part's opaque base.
    struct RoundSpec {
        parts: Vec<(Kind, Ks)>,
        values: Vec<&'static str>,
        base: u32,
    }

    impl RoundSpec {
        fn chain<W: crate::proto::wire::Wire>(&self) -> (OneChain, Vec<u8>) {
            let shape: Vec<_> = (self.parts.iter())
                .map(|(kind, keys)| (*kind, keys.len(), self.base))
                .collect();
            let mut chain = OneChain::new(&shape);
            let parts = self.parts();
            let value = |k: usize, j: usize| {
                (self.parts[k].0 == Kind::Store).then(|| self.values[j].as_bytes())
            };
            let cmd = super::super::commands(|k, j, key: Key<'_>| match self.parts[k].0 {
                Kind::Get => Cmd::Get(key, GetOpts::default()),
                Kind::Store => Cmd::Store(key, StoreOpts::default(), self.values[j].len()),
                _ => Cmd::Delete(key),
            });
            let mut out = Vec::new();
            chain.encode::<W>(&mut out, &parts, &value, &cmd);
            (chain, out)
        }

        fn parts(&self) -> Vec<Part<'_>> {
            (self.parts.iter())
                .map(|(kind, keys)| Part {
                    kind: *kind,
                    keys,
                    result: Ok(()),
                })
                .collect()
        }
    }

    /// Round A: three gets, three stores, two deletes; round B: a get and a delete.
    fn rounds() -> [RoundSpec; 2] {
        [
            RoundSpec {
                parts: vec![
                    (Kind::Get, ks(&["alpha", "beta", "gamma"])),
                    (Kind::Store, ks(&["alpha", "delta", "eps"])),
                    (Kind::Delete, ks(&["gamma", "zeta"])),
                ],
                values: vec!["new", "d", "e"],
                base: 0,
            },
            RoundSpec {
                parts: vec![(Kind::Get, ks(&["omega"])), (Kind::Delete, ks(&["theta"]))],
                values: vec![],
                base: 100,
            },
        ]
    }

    /// Reads `stream` as the replies of `specs`' rounds in turn, the bytes arriving in two
    /// reads split at `split`. Per round what it delivered; `Err` at the first framing error.
    fn read_rounds<W: crate::proto::wire::Wire>(
        specs: &[RoundSpec],
        stream: &[u8],
        split: usize,
    ) -> Result<Vec<(Seen, OneChain)>, ParseError> {
        let mut chains: Vec<(Seen, OneChain)> = (specs.iter())
            .map(|s| (Seen::new(), s.chain::<W>().0))
            .collect();
        let mut rbuf = ReadBuf::new(8, 1 << 20);
        let far = Instant::now() + Duration::from_secs(60);
        let mut cur = 0;
        let at = split.min(stream.len());
        for chunk in [&stream[..at], &stream[at..]] {
            rbuf.push(chunk);
            while cur < specs.len() {
                let parts = specs[cur].parts();
                let (seen, chain) = &mut chains[cur];
                let seen = std::cell::RefCell::new(seen);
                let mut on_hit = |k: usize, j: usize, item: ItemRef<'_>| {
                    let v = String::from_utf8_lossy(item.value);
                    seen.borrow_mut().push((k, j, format!("Hit({v})")));
                };
                let mut on_item = |k: usize, j: usize, o: Outcome<'_>| {
                    seen.borrow_mut().push((k, j, format!("{o:?}")));
                    Ok(())
                };
                // A fresh exchange each time: the read resumes where the last one stopped.
                let mut ex = Exchange::new(0, None, far);
                let r = ex.handle_input(&mut rbuf, &mut |buf| {
                    chain.read::<W>(&parts, buf, &mut on_hit, &mut on_item)
                });
                match r {
                    Ok(_) if ex.is_done() => cur += 1,
                    Ok(_) => break,
                    Err(Failure::Parse(e)) => return Err(e),
                    Err(f) => panic!("{f:?}"),
                }
            }
        }
        assert_eq!(cur, specs.len(), "split {split}: every round read");
        assert!(rbuf.is_empty(), "split {split}: bytes left over");
        Ok(chains)
    }

    /// Every split of both rounds' replies: each item gets exactly its own answer.
    fn check<W: crate::proto::wire::Wire>(replies: [&[u8]; 2], want: [&[(usize, usize, &str)]; 2]) {
        let specs = rounds();
        let stream = replies.concat();
        for split in 0..=stream.len() {
            let got = read_rounds::<W>(&specs, &stream, split)
                .unwrap_or_else(|e| panic!("split {split}: {e:?}"));
            for (r, ((seen, chain), want)) in got.iter().zip(want).enumerate() {
                let want: Seen = (want.iter())
                    .map(|&(k, j, o)| (k, j, o.to_string()))
                    .collect();
                assert_eq!(seen, &want, "split {split}: round {r}");
                assert!(!chain.doubt(), "split {split}: round {r} in doubt");
            }
        }
        // The rounds' replies swapped: round A's reader meets round B's first reply, which
        // answers none of A's items.
        let swapped = [replies[1], replies[0]].concat();
        assert!(
            read_rounds::<W>(&specs, &swapped, swapped.len()).is_err(),
            "round B's replies were taken for round A's"
        );
    }

    #[test]
    fn meta_rounds_back_to_back_split_everywhere() {
        check::<crate::proto::wire::Meta>(
            [
                b"VA 2 f5 O0 kalpha\r\nA1\r\nVA 1 f0 O2 kgamma\r\nG\r\nMN\r\nNS O1\r\nMN\r\nNF O1\r\nMN\r\n",
                b"VA 1 f0 O100 komega\r\nO\r\nMN\r\nNF O100\r\nMN\r\n",
            ],
            [
                &[
                    (0, 0, "Hit(A1)"),
                    (0, 2, "Hit(G)"),
                    (1, 1, "Store(NotStored, None, Some(1))"),
                    (2, 1, "NotFound(Some(1))"),
                ],
                &[(0, 0, "Hit(O)"), (1, 0, "NotFound(Some(100))")],
            ],
        );
    }

    #[test]
    fn text_rounds_back_to_back_split_everywhere() {
        check::<crate::proto::wire::Text>(
            [
                b"VALUE alpha 5 2\r\nA1\r\nVALUE gamma 0 1\r\nG\r\nEND\r\n\
                  STORED\r\nNOT_STORED\r\nSTORED\r\nDELETED\r\nNOT_FOUND\r\n",
                b"VALUE omega 0 1\r\nO\r\nEND\r\nNOT_FOUND\r\n",
            ],
            [
                &[
                    (0, 0, "Hit(A1)"),
                    (0, 2, "Hit(G)"),
                    (1, 0, "Store(Stored, None, None)"),
                    (1, 1, "Store(NotStored, None, None)"),
                    (1, 2, "Store(Stored, None, None)"),
                    (2, 0, "Deleted(None)"),
                    (2, 1, "NotFound(None)"),
                ],
                &[(0, 0, "Hit(O)"), (1, 0, "NotFound(None)")],
            ],
        );
    }

    #[test]
    fn binary_rounds_back_to_back_split_everywhere() {
        let (addq, deleteq) = (0x12, 0x14);
        let a = [
            bin_hit(0, 77, 5, "alpha", "A1"),
            bin_hit(2, 78, 0, "gamma", "G"),
            bin_noop(),
            response(addq, 0x0002, 1, 0, &[], "", "Data exists for key."),
            bin_noop(),
            response(deleteq, 0x0001, 1, 0, &[], "", "Not found"),
            bin_noop(),
        ]
        .concat();
        let b = [
            bin_hit(100, 1, 0, "omega", "O"),
            bin_noop(),
            response(deleteq, 0x0001, 100, 0, &[], "", "Not found"),
            bin_noop(),
        ]
        .concat();
        check::<crate::proto::wire::Binary>(
            [&a, &b],
            [
                &[
                    (0, 0, "Hit(A1)"),
                    (0, 2, "Hit(G)"),
                    (1, 1, "Store(NotStored, None, Some(1))"),
                    (2, 1, "NotFound(Some(1))"),
                ],
                &[(0, 0, "Hit(O)"), (1, 0, "NotFound(Some(100))")],
            ],
        );
    }

    /// An error reply that names its item (binary out of memory for a quiet set) fails its
    /// part, whose replies go on to its no-op: a read interrupted anywhere in that part
    /// resumes in it, never taking its end for the next part's (which would report the
    /// next part's items done before their replies came).
    #[test]
    fn a_read_interrupted_in_a_failed_part_resumes_in_it() {
        let (addq, deleteq) = (0x12, 0x14);
        let a = [
            bin_hit(0, 77, 5, "alpha", "A1"),
            bin_noop(),
            response(addq, 0x0082, 1, 0, &[], "", "Out of memory"),
            bin_noop(),
            response(deleteq, 0x0001, 1, 0, &[], "", "Not found"),
            bin_noop(),
        ]
        .concat();
        let b = [
            bin_noop(),
            response(deleteq, 0x0001, 100, 0, &[], "", "Not found"),
            bin_noop(),
        ]
        .concat();
        let specs = rounds();
        let stream = [a, b].concat();
        for split in 0..=stream.len() {
            let got = read_rounds::<crate::proto::wire::Binary>(&specs, &stream, split)
                .unwrap_or_else(|e| panic!("split {split}: {e:?}"));
            let (seen, chain) = &got[0];
            assert!(chain.failed(1), "split {split}: the stores' part failed");
            assert!(!chain.failed(2), "split {split}: the deletes' part did not");
            assert_eq!(
                seen,
                &vec![
                    (0, 0, "Hit(A1)".to_string()),
                    (2, 1, "NotFound(Some(1))".to_string())
                ],
                "split {split}"
            );
            assert_eq!(got[1].0, vec![(1, 0, "NotFound(Some(100))".to_string())]);
        }
    }
}
