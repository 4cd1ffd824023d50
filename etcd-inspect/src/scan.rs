//! The scan engine: every key under a prefix, in key order, at one revision,
//! with memory bounded by a byte budget and a cost linear in the number of
//! keys. Every caller uses it: the live audit, `--decrypt-check` and the
//! rotator's last gate.
//!
//! # Why ranges are sized, not just limited
//!
//! etcd 3.4 answers a Range request with a limit by first collecting the
//! revision of *every* key in the requested range from its in-memory index
//! (to report `count`) and only then truncating to the limit. Paging a range
//! `[from, prefix_end)` with a fixed limit therefore costs O(remaining keys)
//! per page, O(n²) for the scan: 200,000 small Secrets took 8.6 s against
//! etcdctl's 2.6 s, and a million keys would take minutes. (etcd 3.5 added a
//! limit to that index walk; 3.4 is still what many clusters run.)
//!
//! So each request's *range* is kept small, not only its limit. The engine
//! walks the key space left to right with a window `[from, to)` whose width
//! is chosen so that it holds about one page of keys:
//!
//! - key space is treated as a number line (a key's bytes as a big-endian
//!   fraction); a window's width is a 128-bit number of units at some byte
//!   depth ([`Span`]), so widths from a whole resource down to the last
//!   characters of a name are representable;
//! - the first request covers the whole prefix (that one `count` is O(n),
//!   once); the spread of the keys it returns gives the first width;
//! - after each response the width is rescaled by `target / keys returned`
//!   (at most ×4 up, also when the window was empty), so the window follows
//!   the density of the data: sparse regions are crossed in few requests, a
//!   dense resource in windows of about one page;
//! - each request still carries a limit (the page cap); a window that turns
//!   out denser than predicted is truncated and the measured span of the keys
//!   it returned becomes the next width, so a misprediction costs one
//!   window's keys, once. That span is measured from the first key returned
//!   (not from the window's start) when at least [`DENSITY_KEYS`] came back,
//!   or on the first request: a window that started in a gap would be sized
//!   by the gap;
//! - a window is measured from the *next plausible key*, not from where the
//!   last one ended. Key space has gaps the number line does not know
//!   about: after `ns-009` comes `ns-010`, and `ns-00:` … `ns-00\xff` (247
//!   units at that depth, for a step of one from `ns-000` to `ns-001`) hold
//!   nothing. A window grown ×4 at a time across such a gap lands tens of
//!   namespaces beyond it (after `ns-019`, into `ns-03x`) and etcd counts all
//!   their keys to return one page. So the planner learns which bytes each
//!   key position holds (`Alphabet`; a position is a segment between `/`s
//!   and an offset in it, so `ns-000` lines up under every resource): where
//!   the window's start holds a byte above every byte seen at its position,
//!   the next key increments an earlier position (the next byte seen there,
//!   or the next digit or letter where the position varies or holds a digit)
//!   followed by the smallest bytes seen after it (`ns-010/app-0-…`), and the
//!   window reaches one width beyond *that*. It is only an estimate: every
//!   window still starts right after the last key read, so a wrong guess
//!   costs counted keys, never a missed one.
//!
//! The sum of the `count`s etcd walks is then a small multiple of n instead
//! of n²/(2·page), and flat in n. On the README benchmark's keys (the unit
//! test `simulated_cost_on_kube_shaped_keys` replays the planner on exactly
//! those keys, value sizes approximated, with etcd 3.4's counting rules, and
//! lands within a few percent of what the real etcd reports) it is 2.66,
//! 2.62 and 2.71 entries per key at 100k, 200k and 1M keys, in 158, 205 and
//! 549 requests; on etcd 2.66, 2.63 and 2.70 in 162, 210 and 551. Without the learned
//! positions and with the first width measured from the prefix it was 4.45,
//! 4.41 and 6.74 (etcd: 4.53, 4.70, 6.72 in 190, 242 and 928 requests): at
//! 1M a namespace decade holds more than a page, so every decade crossing
//! counted ~20 namespaces (24,000 keys) for one page, and the second
//! request, sized from `/registry/` to the first page's last key, counted
//! the whole prefix again. What remains above 2 (the first request counts
//! every key once, the windows once more) is the crossing into a resource
//! never seen before: nothing tells where its keys start, so the window that
//! finds them is grown across a gap as wide as the distance between the
//! resource names and counts that resource (0.6 per key here: the Secrets)
//! — once per resource, so at most once per key in all. The tests in
//! `etcd_inspect_scan` pin the bounds on a real etcd through [`ScanStats`]
//! (counted, not timed).
//!
//! Other designs measured or considered: ranges per `/registry/<resource>/`
//! keep counts local but one large resource stays quadratic; a bigger fixed
//! limit only divides the quadratic term; reading etcd's snapshot stream with
//! a bolt reader is linear but reads the whole database (all revisions, all
//! prefixes) and needs the maintenance permission.
//!
//! # Pages
//!
//! A page is sized by a byte budget ([`ScanOptions::page_bytes`]): the key
//! cap per request is the budget divided by the mean size of the key-values
//! seen so far, so small objects come in big pages and 100 KiB ConfigMaps in
//! small ones. The default budget, 4 MiB, counts the least: on the
//! benchmark's 1M keys 1, 2, 4 and 8 MiB give 4.78, 3.26, 2.71 and 2.84
//! entries per key in 1,734, 989, 549 and 361 requests (smaller pages end
//! inside the clusters of generated names, whose spread then misleads the
//! next width). `--page-size` ([`ScanOptions::page_keys`]) fixes the cap
//! instead. A value larger than the budget still gets through (the cap never
//! goes below one key, and a response refused as too large is retried with
//! half the keys, down to one). The fetch task runs one page ahead of the
//! consumer, so at most three pages are alive: the one being judged, one
//! queued, one arriving.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use etcd_client::{GetOptions, KvClient};
use tokio::sync::mpsc;

use crate::etcd::{EtcdError, MAX_RESPONSE_BYTES, prefix_end};

/// Default byte budget of one page: fewer requests and less counting than
/// 1 MiB on large key spaces (module docs), at most three pages alive.
pub const DEFAULT_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// Share of the page cap a window aims at, so that ordinary variation in
/// density fits under the cap instead of truncating the window.
const AIM: f64 = 0.7;

/// Most a window widens from one request to the next. Key spaces have gaps
/// (`cm-000999` → `cm-001000` skips most byte values), and a window grown
/// fast across a gap lands deep in the next dense stretch, whose keys etcd
/// then counts for nothing; ×4 keeps that overshoot small at the price of a
/// few more (cheap, empty) requests.
const GROWTH: f64 = 4.0;

/// Keys a truncated response needs before their own spread is trusted as
/// the density of the region (rather than the width from the window's
/// start). Fewer keys reflect how names cluster (`app-1-…`, `app-10-…`), not
/// the region: with `--page-size 1000` that sizing made 6× more requests
/// on a million kube-shaped keys.
const DENSITY_KEYS: usize = 2000;

/// Mean key-value size assumed before the first page arrives.
const INITIAL_KV_BYTES: usize = 4096;

/// Largest key cap per request when sized by bytes.
const MAX_PAGE_KEYS: i64 = 100_000;

/// How pages are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanOptions {
    /// Fixed number of keys per range request (`--page-size`); `None` sizes
    /// pages by [`page_bytes`](Self::page_bytes).
    pub page_keys: Option<i64>,
    /// Byte budget of one page when `page_keys` is `None`.
    pub page_bytes: usize,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            page_keys: None,
            page_bytes: DEFAULT_PAGE_BYTES,
        }
    }
}

impl ScanOptions {
    /// Pages of a fixed number of keys.
    pub fn keys(n: i64) -> Self {
        ScanOptions {
            page_keys: Some(n.max(1)),
            ..Self::default()
        }
    }
}

/// What a scan cost etcd so far (all counters; read with [`Scan::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Range requests answered (including ones refused as too large).
    pub requests: u64,
    /// Keys received.
    pub keys: u64,
    /// Key and value bytes received.
    pub bytes: u64,
    /// Sum over requests of the `count` etcd reported, i.e. of the keys each
    /// request's range covered: what etcd 3.4 walked in its index. Linear
    /// scans keep this within a small multiple of `keys`.
    pub range_keys: u64,
    /// The largest single `count`.
    pub max_range_keys: u64,
    /// The most keys one response carried.
    pub max_page_keys: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    keys: AtomicU64,
    bytes: AtomicU64,
    range_keys: AtomicU64,
    max_range_keys: AtomicU64,
    max_page_keys: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ScanStats {
        ScanStats {
            requests: self.requests.load(Ordering::Relaxed),
            keys: self.keys.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            range_keys: self.range_keys.load(Ordering::Relaxed),
            max_range_keys: self.max_range_keys.load(Ordering::Relaxed),
            max_page_keys: self.max_page_keys.load(Ordering::Relaxed),
        }
    }
}

/// One key and its stored value.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The etcd key.
    pub key: Vec<u8>,
    /// The stored bytes (possibly plaintext: never logged).
    pub value: Vec<u8>,
    /// The revision that wrote this value (`--history` records it).
    pub mod_revision: i64,
    /// The key's creation revision.
    pub create_revision: i64,
    /// Modifications since creation.
    pub version: i64,
}

impl std::fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("value", &format_args!("<{} bytes>", self.value.len()))
            .field("mod_revision", &self.mod_revision)
            .finish()
    }
}

/// A page of the scan.
#[derive(Debug)]
pub struct Page {
    /// The revision every page of this scan is read at.
    pub revision: i64,
    /// Keys in ascending order, following the previous page's.
    pub kvs: Vec<KeyValue>,
}

/// A scan of `[prefix, prefix_end)` at one revision.
#[derive(Debug)]
pub struct Scan {
    rx: mpsc::Receiver<Result<Page, EtcdError>>,
    task: tokio::task::JoinHandle<()>,
    counters: Arc<Counters>,
}

impl Scan {
    /// Starts scanning; the first request is sent right away and the next
    /// ones while the caller works on the current page.
    /// `endpoints` is only used in error messages.
    pub fn start(kv: KvClient, endpoints: String, prefix: Vec<u8>, options: ScanOptions) -> Self {
        Self::start_at(kv, endpoints, prefix, options, 0)
    }

    /// Like [`start`](Self::start), read at `revision` (0: the current one).
    /// `--history` reads the values kept at the last compaction this way.
    pub fn start_at(
        kv: KvClient,
        endpoints: String,
        prefix: Vec<u8>,
        options: ScanOptions,
        revision: i64,
    ) -> Self {
        // Capacity 1: one page waiting while the consumer holds another.
        let (tx, rx) = mpsc::channel(1);
        let counters = Arc::new(Counters::default());
        let fetcher = Fetcher {
            kv,
            endpoints,
            options,
            counters: counters.clone(),
            tx,
        };
        let task = tokio::spawn(fetcher.run(prefix, revision));
        Scan { rx, task, counters }
    }

    /// The next non-empty page (the first page may be empty), `None` at the
    /// end of the range.
    pub async fn next_page(&mut self) -> Option<Result<Page, EtcdError>> {
        self.rx.recv().await
    }

    /// What the scan has cost so far.
    pub fn stats(&self) -> ScanStats {
        self.counters.snapshot()
    }
}

impl Drop for Scan {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The end of the scanned range; `None` is "to the end of the key space".
type End = Option<Vec<u8>>;

fn below_end(key: &[u8], end: &End) -> bool {
    end.as_ref().is_none_or(|e| key < e.as_slice())
}

/// A width in key space: `w` units of 256^-(depth + 16), i.e. `w` added to
/// the 16 bytes of a key starting at byte `depth`, read big-endian.
/// Kept normalised (`w` in [2^64, 2^72) unless at depth 0) so that scaling
/// keeps 64 bits of precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    depth: usize,
    w: u128,
}

const NORM_LO: u128 = 1 << 64;
const NORM_HI: u128 = 1 << 72;

/// The 16 bytes of `key` from `depth` (zero-padded) as a number.
fn window(key: &[u8], depth: usize) -> u128 {
    let mut b = [0u8; 16];
    if depth < key.len() {
        let src = &key[depth..key.len().min(depth + 16)];
        b[..src.len()].copy_from_slice(src);
    }
    u128::from_be_bytes(b)
}

impl Span {
    fn normalized(mut depth: usize, mut w: u128) -> Self {
        w = w.max(1);
        while w < NORM_LO {
            w <<= 8;
            depth += 1;
        }
        while w >= NORM_HI && depth > 0 {
            w >>= 8;
            depth -= 1;
        }
        // At depth 0 the widest window is half the key space.
        Span {
            depth,
            w: w.min(u128::MAX >> 1),
        }
    }

    /// The width from `a` to `b` (`a < b`).
    fn between(a: &[u8], b: &[u8]) -> Self {
        let depth = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        let w = window(b, depth).saturating_sub(window(a, depth));
        Self::normalized(depth, w)
    }

    /// This width times `f` (clamped to a sane range).
    fn scaled(self, f: f64) -> Self {
        let f = if f.is_finite() {
            f.clamp(1e-6, 1e6)
        } else {
            1.0
        };
        // `as` saturates: a width beyond u128 is capped, then normalised.
        let w = (self.w as f64 * f) as u128;
        Self::normalized(self.depth, w)
    }

    /// `from + self`, capped at `end`; always greater than `from`.
    fn advance(self, from: &[u8], end: &End) -> End {
        let mut base: Vec<u8> = from[..from.len().min(self.depth)].to_vec();
        base.resize(self.depth, 0);
        let to = match window(from, self.depth).checked_add(self.w) {
            Some(v) => {
                let bytes = v.to_be_bytes();
                // v > 0, so a nonzero byte remains; dropping trailing zeros
                // keeps the order against every key.
                let keep = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                base.extend_from_slice(&bytes[..keep]);
                Some(base)
            }
            // Carried past the depth: the end of the region sharing `base`.
            None => {
                let e = prefix_end(&base);
                if e == [0] { None } else { Some(e) }
            }
        };
        match (to, end) {
            (Some(t), Some(e)) if t < *e => Some(t),
            (Some(t), None) => Some(t),
            _ => end.clone(),
        }
    }
}

/// '/'-separated segments of a key whose byte positions are learned.
const ALPHABET_SEGMENTS: usize = 16;
/// Byte positions learned per segment.
const ALPHABET_OFFSETS: usize = 64;

/// Which bytes the keys read so far hold at each position, a position being
/// (segment, offset in the segment) so that `ns-000` sits at the same
/// position under `/registry/secrets/` and `/registry/configmaps/`. It
/// tells where the next key can plausibly be after a region's last one
/// (`ns-009` is followed by `ns-010`, not by `ns-00:`): see
/// [`Planner::request`]. Only a size estimate: a window always starts right
/// after the last key read, so a wrong guess costs counted keys, never
/// missed ones.
#[derive(Debug, Default)]
struct Alphabet {
    sets: Vec<[u64; 4]>,
}

impl Alphabet {
    /// The slot of every byte position of `key` that is learned.
    fn slots(key: &[u8]) -> impl Iterator<Item = Option<usize>> + '_ {
        let (mut seg, mut off) = (0usize, 0usize);
        key.iter().map(move |&b| {
            let slot = (seg < ALPHABET_SEGMENTS && off < ALPHABET_OFFSETS)
                .then_some(seg * ALPHABET_OFFSETS + off);
            if b == b'/' {
                seg += 1;
                off = 0;
            } else {
                off += 1;
            }
            slot
        })
    }

    fn learn(&mut self, key: &[u8]) {
        if self.sets.is_empty() {
            self.sets = vec![[0; 4]; ALPHABET_SEGMENTS * ALPHABET_OFFSETS];
        }
        for (slot, &b) in Self::slots(key).zip(key) {
            if let Some(set) = slot.and_then(|s| self.sets.get_mut(s)) {
                set[usize::from(b >> 6)] |= 1 << (b & 63);
            }
        }
    }

    fn has(&self, slot: usize, b: u8) -> bool {
        self.sets
            .get(slot)
            .is_some_and(|set| set[usize::from(b >> 6)] & (1 << (b & 63)) != 0)
    }

    /// The smallest byte seen at `slot` that is at least `from`.
    fn at_least(&self, slot: usize, from: u16) -> Option<u8> {
        (from..256).map(|b| b as u8).find(|&b| self.has(slot, b))
    }

    fn count(&self, slot: usize) -> u32 {
        self.sets
            .get(slot)
            .map_or(0, |set| set.iter().map(|w| w.count_ones()).sum())
    }

    /// The first plausible key after `from` (which lies past the last key
    /// read): where `from` holds a byte above every byte seen at its
    /// position, the region is exhausted, and the next key increments an
    /// earlier position that varies (the next namespace digit), followed by
    /// the smallest bytes seen at the positions after it, up to `depth`.
    /// `None` when nothing is known (no carry within varying positions).
    fn next_plausible(&self, from: &[u8], depth: usize) -> Option<Vec<u8>> {
        let slots: Vec<Option<usize>> = Self::slots(from).collect();
        let i = (0..from.len()).find(|&i| {
            slots[i].is_some_and(|s| {
                self.count(s) > 0 && self.at_least(s, u16::from(from[i])).is_none()
            })
        })?;
        for j in (0..i).rev() {
            let s = slots[j]?;
            let b = from[j];
            // The next byte seen there; where the position varies or holds
            // a digit, also the next of its class (`1` after `0` when only
            // `0` was seen: `ns-099` is followed by `ns-100`); else carry to
            // the position before (past `app-` when every name starts so).
            let counts = self.count(s) >= 2 || b.is_ascii_digit();
            let next = self.at_least(s, u16::from(b) + 1).or_else(|| {
                let c = b.wrapping_add(1);
                let same = (b.is_ascii_digit() && c.is_ascii_digit())
                    || (b.is_ascii_lowercase() && c.is_ascii_lowercase())
                    || (b.is_ascii_uppercase() && c.is_ascii_uppercase());
                (counts && same).then_some(c)
            });
            if let Some(b) = next {
                let mut out = from[..j].to_vec();
                out.push(b);
                // The smallest bytes seen at the following positions, as
                // deep as the width reaches.
                while out.len() < depth + 16 {
                    let Some(m) = Self::slot_after(&out).and_then(|s| self.at_least(s, 0)) else {
                        break;
                    };
                    out.push(m);
                }
                return Some(out);
            }
        }
        None
    }

    /// The slot of the byte that would follow `key`.
    fn slot_after(key: &[u8]) -> Option<usize> {
        let seg = key.iter().filter(|&&b| b == b'/').count();
        let off = key.len() - key.iter().rposition(|&b| b == b'/').map_or(0, |p| p + 1);
        (seg < ALPHABET_SEGMENTS && off < ALPHABET_OFFSETS).then_some(seg * ALPHABET_OFFSETS + off)
    }
}

/// One range request the planner asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    from: Vec<u8>,
    /// `None`: to the end of the key space.
    to: End,
    /// Key limit.
    cap: i64,
}

/// What a response said, for the planner (no values).
#[derive(Debug, Clone, Copy)]
struct Reply<'a> {
    /// Keys returned.
    n: usize,
    /// Key and value bytes returned.
    bytes: usize,
    /// Truncated by the limit.
    more: bool,
    first: Option<&'a [u8]>,
    last: Option<&'a [u8]>,
}

/// The window logic of the scan, without I/O: which range to ask for next,
/// given what the previous ones returned (see the module docs). Pure, so
/// that its cost on a key set can be computed without an etcd.
#[derive(Debug)]
struct Planner {
    options: ScanOptions,
    end: End,
    from: Vec<u8>,
    span: Option<Span>,
    /// Bytes seen at each key position.
    alphabet: Alphabet,
    mean_kv_bytes: f64,
    /// Lowered after a response too large to decode; grows back.
    shrink: i64,
    /// A response with keys has been seen.
    seen_keys: bool,
    done: bool,
}

impl Planner {
    fn new(prefix: Vec<u8>, options: ScanOptions) -> Self {
        let end: End = {
            let e = prefix_end(&prefix);
            if e == [0] { None } else { Some(e) }
        };
        Planner {
            options,
            end,
            from: prefix,
            span: None,
            alphabet: Alphabet::default(),
            mean_kv_bytes: INITIAL_KV_BYTES as f64,
            shrink: 1,
            seen_keys: false,
            done: false,
        }
    }

    /// Key cap of a request.
    fn cap(&self) -> i64 {
        match self.options.page_keys {
            Some(n) => n.max(1),
            None => {
                let n = self.options.page_bytes as f64 / self.mean_kv_bytes.max(1.0);
                (n as i64).clamp(1, MAX_PAGE_KEYS)
            }
        }
    }

    /// The next request, `None` when the range is done.
    fn request(&self) -> Option<Request> {
        if self.done {
            return None;
        }
        let to = match self.span {
            Some(s) => match self.alphabet.next_plausible(&self.from, s.depth) {
                Some(next) => s.advance(&next, &self.end),
                None => s.advance(&self.from, &self.end),
            },
            None => self.end.clone(),
        };
        Some(Request {
            from: self.from.clone(),
            to,
            cap: (self.cap() / self.shrink).max(1),
        })
    }

    /// The response to `req` was too large to decode: ask for fewer keys.
    /// `false` when it was a single key already.
    fn too_large(&mut self, req: &Request) -> bool {
        if req.cap == 1 {
            return false;
        }
        self.shrink *= 2;
        true
    }

    /// Learns the byte positions of a key returned (call for each, before
    /// [`reply`](Self::reply)).
    fn learn(&mut self, key: &[u8]) {
        self.alphabet.learn(key);
    }

    /// Takes in the response to `req`.
    fn reply(&mut self, req: &Request, r: Reply<'_>) {
        if r.n > 0 {
            // Weighted toward the recent pages: sizes change by resource.
            let page_mean = r.bytes as f64 / r.n as f64;
            self.mean_kv_bytes = if self.seen_keys {
                0.5 * self.mean_kv_bytes + 0.5 * page_mean
            } else {
                page_mean
            };
            self.seen_keys = true;
        }
        let target = (self.cap() as f64 * AIM).max(1.0);
        // Where the next window starts, and how wide it is.
        let next_from = match (r.more, r.last) {
            (true, Some(last)) => {
                // Truncated: the keys read span [from, last]; the rest
                // of the window is denser than predicted.
                let mut next = last.to_vec();
                next.push(0);
                // When enough keys came back, their own spread is the
                // density; from `from` it would include the gap before the
                // first key (a window that crossed a gap into a dense region
                // would otherwise size the next one by the gap, overshoot
                // the region's rest and the next gap, and cascade).
                let start = match r.first {
                    Some(f) if r.n >= DENSITY_KEYS || self.span.is_none() => f,
                    _ => &req.from,
                };
                self.span = Some(Span::between(start, &next).scaled(target / r.n as f64));
                Some(next)
            }
            // A response that is truncated without keys cannot happen;
            // read it as the end.
            (true, None) => None,
            (false, _) => {
                // The whole window was read; rescale it toward the target.
                if let Some(s) = self.span {
                    let f = if r.n == 0 {
                        GROWTH
                    } else {
                        target / r.n as f64
                    };
                    self.span = Some(s.scaled(f.min(GROWTH)));
                }
                req.to.clone()
            }
        };
        self.shrink = (self.shrink / 2).max(1);
        match next_from {
            Some(k) if below_end(&k, &self.end) => self.from = k,
            _ => self.done = true,
        }
    }
}

struct Fetcher {
    kv: KvClient,
    endpoints: String,
    options: ScanOptions,
    counters: Arc<Counters>,
    tx: mpsc::Sender<Result<Page, EtcdError>>,
}

impl Fetcher {
    async fn run(mut self, prefix: Vec<u8>, revision: i64) {
        if let Err(e) = self.scan(prefix, revision).await {
            let _ = self.tx.send(Err(e)).await;
        }
    }

    async fn scan(&mut self, prefix: Vec<u8>, mut revision: i64) -> Result<(), EtcdError> {
        let mut planner = Planner::new(prefix, self.options);
        let mut sent_any = false;
        while let Some(req) = planner.request() {
            let opts = GetOptions::new()
                .with_range(req.to.clone().unwrap_or_else(|| vec![0]))
                .with_limit(req.cap)
                .with_revision(revision);
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let mut resp = match self.kv.get(req.from.clone(), Some(opts)).await {
                Ok(r) => r,
                Err(e) if is_too_large(&e) => {
                    // Big values: ask for fewer keys rather than a bigger buffer.
                    if planner.too_large(&req) {
                        continue;
                    }
                    return Err(EtcdError::TooLarge {
                        from: String::from_utf8_lossy(&req.from).into_owned(),
                        limit: MAX_RESPONSE_BYTES,
                    });
                }
                Err(source) => {
                    return Err(EtcdError::Range {
                        endpoints: self.endpoints.clone(),
                        from: String::from_utf8_lossy(&req.from).into_owned(),
                        revision,
                        source,
                    });
                }
            };
            if revision == 0 {
                revision = resp.header().ok_or(EtcdError::NoHeader)?.revision();
            }
            let count = u64::try_from(resp.count()).unwrap_or(0);
            self.counters.range_keys.fetch_add(count, Ordering::Relaxed);
            self.counters
                .max_range_keys
                .fetch_max(count, Ordering::Relaxed);
            let more = resp.more();
            let kvs: Vec<KeyValue> = resp
                .take_kvs()
                .into_iter()
                .map(|kv| {
                    let (mod_revision, create_revision, version) =
                        (kv.mod_revision(), kv.create_revision(), kv.version());
                    let (key, value) = kv.into_key_value();
                    KeyValue {
                        key,
                        value,
                        mod_revision,
                        create_revision,
                        version,
                    }
                })
                .collect();
            let n = kvs.len();
            let bytes: usize = kvs.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
            // The planner's trace (`ATREST_LOG=etcd_inspect::scan=trace`):
            // what each window cost etcd (`count`) against what it returned.
            tracing::trace!(
                from = %String::from_utf8_lossy(&req.from),
                to = %String::from_utf8_lossy(req.to.as_deref().unwrap_or(b"")),
                limit = req.cap,
                count,
                keys = n,
                bytes,
                more,
                "etcd range"
            );
            self.counters.keys.fetch_add(n as u64, Ordering::Relaxed);
            self.counters
                .max_page_keys
                .fetch_max(n as u64, Ordering::Relaxed);
            self.counters
                .bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
            for kv in &kvs {
                planner.learn(&kv.key);
            }
            planner.reply(
                &req,
                Reply {
                    n,
                    bytes,
                    more,
                    first: kvs.first().map(|kv| kv.key.as_slice()),
                    last: kvs.last().map(|kv| kv.key.as_slice()),
                },
            );
            if n > 0 || (!sent_any && planner.done) {
                sent_any = true;
                if self.tx.send(Ok(Page { revision, kvs })).await.is_err() {
                    return Ok(()); // consumer gone
                }
            }
        }
        if !sent_any {
            let _ = self
                .tx
                .send(Ok(Page {
                    revision,
                    kvs: Vec::new(),
                }))
                .await;
        }
        Ok(())
    }
}

fn is_too_large(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            // tonic's decoder refuses an oversized response with this
            // status; etcd itself also uses OutOfRange (future revision), so
            // the message is checked too.
            matches!(
                s.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ) && s.message().contains("message length too large")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a scan costs on a key set, computed with etcd 3.4's rules: a
    /// request's `count` is every key in `[from, to)`, it returns the first
    /// `cap` of them and `more` when there were more.
    #[derive(Debug, Default)]
    struct Simulated {
        requests: u64,
        range_keys: u64,
        keys: Vec<Vec<u8>>,
    }

    fn simulate(data: &[(Vec<u8>, usize)], prefix: &[u8], options: ScanOptions) -> Simulated {
        let mut planner = Planner::new(prefix.to_vec(), options);
        let mut out = Simulated::default();
        while let Some(req) = planner.request() {
            out.requests += 1;
            let lo = data.partition_point(|(k, _)| k.as_slice() < req.from.as_slice());
            let hi = match &req.to {
                Some(t) => data.partition_point(|(k, _)| k.as_slice() < t.as_slice()),
                None => data.len(),
            };
            let count = hi.saturating_sub(lo);
            out.range_keys += count as u64;
            let n = count.min(req.cap as usize);
            let page = &data[lo..lo + n];
            out.keys.extend(page.iter().map(|(k, _)| k.clone()));
            for (k, _) in page {
                planner.learn(k);
            }
            planner.reply(
                &req,
                Reply {
                    n,
                    bytes: page.iter().map(|(k, v)| k.len() + v).sum(),
                    more: count > n,
                    first: page.first().map(|(k, _)| k.as_slice()),
                    last: page.last().map(|(k, _)| k.as_slice()),
                },
            );
            assert!(out.requests < 10_000_000, "runaway scan");
        }
        out
    }

    /// The README benchmark's keys and value sizes, item for item: the same
    /// generator as `bench/src/inspect.rs` (xorshift64* seeded by splitmix64
    /// of the item number; 500 namespaces, generated names, 60% Secrets of
    /// 0.2-1.2 KB, 40% ConfigMaps of 0.3-2 KB, one in 500 of 100 KiB), the
    /// stored size being the object plus ~120 bytes of framing and
    /// encryption. Sorted, deduplicated.
    fn kube_keys(n: u64) -> Vec<(Vec<u8>, usize)> {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut out: Vec<(Vec<u8>, usize)> = (0..n)
            .map(|i| {
                let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                let mut x = (z ^ (z >> 31)) | 1;
                let mut below = move |n: u64| {
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    x.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
                };
                let ns = below(500);
                let app = below(40);
                let suffix: String = (0..5)
                    .map(|_| ALPHABET[below(27) as usize] as char)
                    .collect();
                let (res, kind, size) = if i % 500 == 499 {
                    ("configmaps", "bundle", 100 * 1024)
                } else if below(10) < 4 {
                    ("configmaps", "config", 300 + below(1700) as usize)
                } else {
                    ("secrets", "token", 200 + below(1000) as usize)
                };
                let key = format!("/registry/{res}/ns-{ns:03}/app-{app}-{kind}-{suffix}");
                (key.into_bytes(), size + 120)
            })
            .collect();
        out.sort();
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }

    /// The default engine on the benchmark's key sets of 100k and 1M keys:
    /// 2.66 and 2.71 entries counted per key, in 158 and 549 requests (the
    /// real etcd: 2.66 in 162 and 2.70 in 551; value sizes are approximated).
    /// Before the learned alphabet and with the first width measured from
    /// the prefix it was 4.45 and 6.74 per key in 186 and 924 requests
    /// (etcd: 4.53 and 6.72 in 190 and 928): the growth the benchmark saw.
    /// What remains: the first request (1 per key), the keys returned (1)
    /// and the crossing into the next resource, whose keys the window that
    /// finds them counts once (0.6 here: the Secrets).
    #[test]
    fn simulated_cost_on_kube_shaped_keys() {
        let mut costs = Vec::new();
        for n in [100_000u64, 1_000_000] {
            let data = kube_keys(n);
            let sim = simulate(&data, b"/registry/", ScanOptions::default());
            assert_eq!(sim.keys.len(), data.len());
            assert!(sim.keys.iter().zip(&data).all(|(a, b)| *a == b.0));
            let per_key = sim.range_keys as f64 / data.len() as f64;
            eprintln!(
                "{n}: {} requests, {per_key:.2} counted per key",
                sim.requests
            );
            assert!(per_key <= 2.9, "{n} keys: {per_key:.2} counted per key");
            // About one request per 2,000 keys (a window aims at 0.7 of a
            // ~3,400-key page), plus the empty ones crossing to a resource.
            assert!(
                sim.requests <= 120 + n / 1800,
                "{n} keys: {} requests",
                sim.requests
            );
            costs.push(per_key);
        }
        // Flat: ten times the keys, the same cost per key.
        assert!(costs[1] <= costs[0] + 0.15, "{costs:?}");
    }

    /// `--page-size` pages learn the namespace and name structure too: on
    /// 200k benchmark keys in pages of 500, 645 requests and 3.88 counted
    /// per key (1,004 and 7.65 without the learned alphabet).
    #[test]
    fn simulated_cost_with_small_fixed_pages() {
        let data = kube_keys(200_000);
        let sim = simulate(&data, b"/registry/", ScanOptions::keys(500));
        assert_eq!(sim.keys.len(), data.len());
        let per_key = sim.range_keys as f64 / data.len() as f64;
        eprintln!("{} requests, {per_key:.2} counted per key", sim.requests);
        assert!(per_key <= 4.5, "{per_key:.2} counted per key");
        assert!(sim.requests <= 800, "{} requests", sim.requests);
    }

    #[test]
    fn next_plausible_key_follows_learned_positions() {
        let mut a = Alphabet::default();
        for ns in 0..10 {
            for app in ["app-1-token-bcd", "app-22-config-xyz"] {
                a.learn(format!("/registry/secrets/ns-00{ns}/{app}").as_bytes());
            }
        }
        let next = |from: &[u8]| {
            a.next_plausible(from, 20)
                .map(|k| String::from_utf8(k).unwrap())
        };
        // Past the last name of ns-009 (`:` is above every digit seen):
        // the next namespace, completed with the smallest bytes seen.
        let n = next(b"/registry/secrets/ns-009/app-:").unwrap();
        assert!(n.starts_with("/registry/secrets/ns-010/app-1"), "{n}");
        // Only `0` seen as the hundreds digit: a digit counts up anyway.
        let n = next(b"/registry/secrets/ns-09:").unwrap();
        assert!(n.starts_with("/registry/secrets/ns-100/app-1"), "{n}");
        // Inside the learned structure: nothing to skip.
        assert_eq!(next(b"/registry/secrets/ns-004/app-1-token-bcd\0"), None);
        // Beyond the last resource nothing is known: no guess.
        assert_eq!(next(b"/registry/t"), None);
        // Always past `from`.
        let from = b"/registry/secrets/ns-003/app-22-config-xz~";
        assert!(next(from).unwrap().as_bytes() > from.as_slice());
    }

    #[test]
    fn debug_hides_values() {
        let kv = KeyValue {
            key: b"/registry/secrets/a/b".to_vec(),
            value: b"CANARY".to_vec(),
            mod_revision: 2,
            create_revision: 2,
            version: 1,
        };
        let s = format!("{kv:?}");
        assert!(!s.contains("CANARY"));
        assert!(s.contains("/registry/secrets/a/b"));
    }

    #[test]
    fn span_between_and_advance_round_trip() {
        let a = b"/registry/secrets/ns/secret-000100".as_slice();
        let b = b"/registry/secrets/ns/secret-000200".as_slice();
        let s = Span::between(a, b);
        let end = Some(b"/registry0".to_vec());
        assert_eq!(s.advance(a, &end).as_deref(), Some(b));
        // Twice the width from b lands beyond 000300 but before 000400.
        let t = s.scaled(2.0).advance(b, &end).unwrap();
        assert!(t.as_slice() > b"/registry/secrets/ns/secret-000399".as_slice());
        assert!(t.as_slice() < b"/registry/secrets/ns/secret-000401".as_slice());
    }

    #[test]
    fn advance_is_always_past_from_and_capped_at_end() {
        let end = Some(b"/registry0".to_vec());
        let tiny = Span::normalized(40, 1);
        let from = b"/registry/a".as_slice();
        let to = tiny.advance(from, &end).unwrap();
        assert!(to.as_slice() > from);
        // A huge width stops at the end of the range.
        let huge = Span::normalized(0, u128::MAX);
        assert_eq!(huge.advance(from, &end), end);
        let to = huge.advance(from, &None).unwrap();
        assert!(to.as_slice() > b"/\xff".as_slice());
        // A key near the top of the key space carries out: no end.
        assert_eq!(huge.advance(b"\xff\xff", &None), None);
        // A carry past the depth ends the region sharing the prefix.
        let s = Span::normalized(12, NORM_LO);
        let mut from = b"/registry/ab".to_vec();
        from.extend([0xff; 16]);
        assert_eq!(s.advance(&from, &end), Some(b"/registry/ac".to_vec()));
    }

    #[test]
    fn scaling_grows_from_deep_to_shallow() {
        let mut s = Span::normalized(30, 1);
        for _ in 0..200 {
            s = s.scaled(16.0);
        }
        assert_eq!(s.depth, 0);
        let end = Some(b"/registry0".to_vec());
        assert_eq!(s.advance(b"/registry/a", &end), end);
    }
}
