//! Top-k selection over a [`Stream`]: which positions hold the k largest
//! keys (ties to the lower flat index), found in two counting passes over
//! the mapped bytes with no per-position buffer. A radix select over 16-bit
//! digits: the first pass counts the high digits of every key, which names
//! the bucket the k-th largest is in; the second collects, per chunk, the
//! low digits of the keys in that bucket, which give the exact threshold and
//! how many ties at it each chunk holds. A later pass then decides each
//! position from its chunk's [`Rule`] as it goes. Several selections (one
//! per input, say) share the passes.

use crate::stream::Stream;
use crate::tensors::front;

/// Where the k largest keys end: everything above `threshold`, and of the
/// keys equal to it the `ties_wanted` with the lowest indices; per chunk of
/// the stream, the ties before it and in it.
#[derive(Debug, Clone)]
pub enum Cut {
    Nothing,
    Everything,
    At {
        threshold: u32,
        ties_wanted: usize,
        chunks: Vec<(usize, usize)>,
    },
}

/// Which keys of one chunk are among the k largest.
#[derive(Debug, Clone, Copy)]
pub enum Rule {
    Nothing,
    /// Every key at least this.
    From(u32),
    /// Every key above `threshold`, and of the ties the first up to rank
    /// `wanted`, counting from `rank` (the ties before the chunk).
    Ranked {
        threshold: u32,
        rank: usize,
        wanted: usize,
    },
}

impl Cut {
    /// The rule for chunk `c`: chunks before the cut take all their ties,
    /// chunks after it none, and only the one the cut falls in ranks them.
    pub fn rule(&self, c: usize) -> Rule {
        match *self {
            Cut::Nothing => Rule::Nothing,
            Cut::Everything => Rule::From(0),
            Cut::At {
                threshold,
                ties_wanted,
                ref chunks,
            } => {
                let (before, ties) = chunks[c];
                if before + ties <= ties_wanted {
                    Rule::From(threshold)
                } else if before >= ties_wanted {
                    threshold.checked_add(1).map_or(Rule::Nothing, Rule::From)
                } else {
                    Rule::Ranked {
                        threshold,
                        rank: before,
                        wanted: ties_wanted,
                    }
                }
            }
        }
    }
}

impl Rule {
    /// Whether each key of the chunk, in order, is selected.
    pub fn selector(self) -> impl FnMut(u32) -> bool {
        let (threshold, mut rank, wanted, ranked) = match self {
            Rule::Nothing => (u32::MAX, 0, 0, 2),
            Rule::From(t) => (t, 0, 0, 0),
            Rule::Ranked {
                threshold,
                rank,
                wanted,
            } => (threshold, rank, wanted, 1),
        };
        move |key| match ranked {
            0 => key >= threshold,
            1 => {
                // Selects on bits: which side a tie falls is a coin flip.
                let tie = key == threshold;
                rank += usize::from(tie);
                (key > threshold) | (tie & (rank <= wanted))
            }
            _ => false,
        }
    }
}

/// One top-k selection: how many of the largest keys it takes, given the
/// histogram of the keys' high digits and how many keys are 0 (so a quota
/// can depend on how many positions are free, or how many keys are not 0).
pub type Count<'a> = Box<dyn Fn(&[u64], u64) -> usize + Sync + 'a>;

/// Key 0 is counted in spare bins past the end, spread so that the
/// increments do not wait on each other (many keys are 0: positions another
/// input owns, deltas that are exactly zero).
const SPARE: usize = 8;

/// Bins of one selection's histogram of high digits.
pub const BINS: usize = (1 << 16) + SPARE;

/// Adds the high digits of `keys` to `h` (`1 << 16` bins and the spares).
pub fn count_high(h: &mut [u32], keys: &[u32]) {
    for (j, &key) in keys.iter().enumerate() {
        // A select, not a branch: whether a key is 0 is a coin flip.
        let zero = usize::from(key == 0).wrapping_neg();
        let bin = (((1 << 16) + j % SPARE) & zero) | ((key >> 16) as usize & !zero);
        h[bin] += 1;
    }
}

/// Counts `keys` for a chunk outside the sample once a window is guessed:
/// the keys in the window are kept (in order, as [`Window::keep`]) and
/// their high digits counted, but the others only by side. Keys above the
/// window go to the bin just above it, keys below it to the bin just below
/// it, 0 to the spares. So the totals and the zeros stay exact while the
/// loop over every key is compares and adds, without scattered increments;
/// [`cuts_counted`] counts again in full when the cut falls outside the
/// window after all.
pub fn count_high_keeping(h: &mut [u32], keys: &[u32], window: Window, out: &mut Vec<u32>) {
    let span = window.hi - window.lo;
    let inside = |k: u32| (k >> 16).wrapping_sub(window.lo) <= span;
    let (mut above, mut zeros, mut counted) = (0u32, 0u32, 0u32);
    let mut keep = |k: u32| {
        if inside(k) {
            out.push(k);
            // 0 is in the window when it starts at digit 0; it is counted
            // with the zeros.
            h[(k >> 16) as usize] += u32::from(k != 0);
            counted += u32::from(k != 0);
        }
    };
    let (blocks, tail) = keys.as_chunks::<8>();
    for block in blocks {
        let mut any = false;
        for &k in block {
            above += u32::from(k >> 16 > window.hi);
            zeros += u32::from(k == 0);
            any |= inside(k);
        }
        if any {
            block.iter().for_each(|&k| keep(k));
        }
    }
    for &k in tail {
        above += u32::from(k >> 16 > window.hi);
        zeros += u32::from(k == 0);
        keep(k);
    }
    // Keys are below the window only where it starts above digit 0, and
    // above it only where it ends below the last digit.
    let below = keys.len() as u32 - above - zeros - counted;
    if below > 0 {
        h[window.lo as usize - 1] += below;
    }
    if above > 0 {
        h[window.hi as usize + 1] += above;
    }
    h[1 << 16] += zeros;
}

/// Per-thread counts summed: `selections` histograms of the 2^16 high
/// digits (spares folded into bin 0).
pub fn totals(h: &[u32], selections: usize) -> Vec<Vec<u64>> {
    h.chunks(BINS)
        .take(selections)
        .map(|h| {
            let mut total: Vec<u64> = h[..1 << 16].iter().map(|&c| u64::from(c)).collect();
            total[0] += h[1 << 16..].iter().map(|&c| u64::from(c)).sum::<u64>();
            total
        })
        .collect()
}

/// How many keys of selection `s` in `h` (per-thread counts summed, as
/// for [`totals`]) are 0.
fn zeros(h: &[u32], s: usize) -> u64 {
    h[s * BINS + (1 << 16)..(s + 1) * BINS]
        .iter()
        .map(|&c| u64::from(c))
        .sum()
}

/// From the largest digit down: the digit holding the k-th largest, and
/// the count above it (`None`: fewer than k keys).
fn locate(h: &[u64], k: u64) -> Option<(usize, u64)> {
    let mut above = 0u64;
    for d in (0..h.len()).rev() {
        if above + h[d] >= k {
            return Some((d, above));
        }
        above += h[d];
    }
    None
}

thread_local! {
    /// Each thread's keys of one chunk.
    static KEYS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's key buffer, `len` long.
pub fn with_keys<T>(len: usize, f: impl FnOnce(&mut [u32]) -> T) -> T {
    KEYS.with_borrow_mut(|keys| f(front(keys, len)))
}

/// Every `SAMPLE_EVERY`-th chunk is counted first: its histogram guesses
/// which high digits the cut falls among, so the pass over the other chunks
/// can keep the keys there and the second pass only revisits the sample.
const SAMPLE_EVERY: usize = 16;

/// The sampled chunks, when there are enough chunks to guess from.
pub fn sample(stream: &Stream) -> Option<Vec<usize>> {
    let chunks = stream.chunks();
    (chunks >= 4 * SAMPLE_EVERY).then(|| (SAMPLE_EVERY / 2..chunks).step_by(SAMPLE_EVERY).collect())
}

/// Whether chunk `c` is in the sample.
pub(super) fn sampled(c: usize) -> bool {
    c % SAMPLE_EVERY == SAMPLE_EVERY / 2
}

/// A range of high digits (inclusive) expected to hold a cut.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    lo: u32,
    hi: u32,
}

impl Window {
    fn contains(self, digit: usize) -> bool {
        (self.lo as usize..=self.hi as usize).contains(&digit)
    }

    /// Appends the keys of `keys` whose high digit is in the window, in
    /// order. Most keys are outside: blocks of 8 are tested without
    /// branches first.
    pub fn keep(self, keys: &[u32], out: &mut Vec<u32>) {
        let span = self.hi - self.lo;
        let inside = |k: u32| (k >> 16).wrapping_sub(self.lo) <= span;
        let (blocks, tail) = keys.as_chunks::<8>();
        for block in blocks {
            if block.iter().fold(false, |any, &k| any | inside(k)) {
                out.extend(block.iter().copied().filter(|&k| inside(k)));
            }
        }
        out.extend(tail.iter().copied().filter(|&k| inside(k)));
    }
}

/// Where a sample's histogram `h` (totals of the 2^16 high digits) says the cut falls when
/// `fraction` of all keys are taken, with a margin for sampling error;
/// `None` when there is nothing to cut or the window would hold more than
/// 4% of the keys (too many to keep).
pub fn guess(h: &[u64], fraction: f64) -> Option<Window> {
    let n = h.iter().sum::<u64>() as f64;
    let k = fraction * n;
    if k.is_nan() || k < 1.0 || k >= n {
        return None;
    }
    let margin = 4.0 * k.sqrt() + n / 1000.0 + 1.0;
    let (hi, _) = locate(h, (k - margin).max(1.0) as u64)?;
    // Near the bottom (k + margin past n) the window ends at the smallest key.
    let lo = locate(h, ((k + margin) as u64).min(n as u64)).map_or(0, |(d, _)| d);
    let inside: u64 = h[lo..=hi].iter().sum();
    (inside as f64 <= n / 25.0).then_some(Window {
        lo: lo as u32,
        hi: hi as u32,
    })
}

/// A chunk outside the sample, with its kept keys per selection.
pub type Slot<'a> = (usize, &'a mut Vec<Vec<u32>>);

/// What the counting pass over the chunks outside the sample kept: each
/// selection's window, and per chunk, per selection, its keys inside it.
pub struct Kept {
    windows: Vec<Option<Window>>,
    keys: Vec<Vec<Vec<u32>>>,
}

impl Kept {
    pub fn new(stream: &Stream, windows: Vec<Option<Window>>) -> Self {
        let keys = vec![vec![Vec::new(); windows.len()]; stream.chunks()];
        Kept { windows, keys }
    }

    /// The chunks outside the sample, each with its slot of kept keys.
    pub fn slots(&mut self) -> (&[Option<Window>], Vec<Slot<'_>>) {
        let slots = self
            .keys
            .iter_mut()
            .enumerate()
            .filter(|(c, _)| !sampled(*c))
            .collect();
        (&self.windows, slots)
    }
}

/// The cut of each selection `s`: the `counts[s]` largest of the keys that
/// `key(s, c, chunk, keys)` writes for chunk `c` (operands `which` of
/// `stream`, decoded; `keys` as long as the chunk). The key function runs
/// at least once per chunk and again for revisited chunks, and must give
/// the same keys each time. Where `same_keys[s]`, selection s has
/// selection s − 1's keys (breadcrumbs' two cuts of one input): they are
/// made once, and counted once in the sample.
pub fn cuts(
    stream: &Stream,
    which: &[usize],
    counts: &[Count],
    same_keys: &[bool],
    key: &(impl Fn(usize, usize, &[&[f32]], &mut [u32]) + Sync),
) -> Vec<Cut> {
    let selections = counts.len();
    let shared = |s: usize| same_keys.get(s) == Some(&true);
    // A selection sharing its keys takes the selection before's histogram
    // where both are exact: in the sample (no windows yet), and past it
    // where neither has a window.
    let copied = |s: usize, windows: &[Option<Window>]| {
        let exact = |s: usize| windows.get(s).is_none_or(Option::is_none);
        s > 0 && shared(s) && exact(s) && exact(s - 1)
    };
    let count = |items: Vec<(usize, Option<&mut Vec<Vec<u32>>>)>, windows: &[Option<Window>]| {
        let mut high = stream.fold(
            which,
            items,
            || vec![0u32; selections * BINS],
            |mut h, c, mut slot, chunk| {
                with_keys(stream.chunk_len(c), |keys| {
                    for (s, h) in h.chunks_mut(BINS).enumerate() {
                        if !shared(s) {
                            key(s, c, chunk, keys);
                        }
                        // Past the sample each selection counts for itself:
                        // its histogram is exact only inside its own window.
                        match (slot.as_mut(), windows.get(s)) {
                            _ if copied(s, windows) => {}
                            (Some(slot), Some(Some(w))) => {
                                count_high_keeping(h, keys, *w, &mut slot[s])
                            }
                            _ => count_high(h, keys),
                        }
                    }
                });
                h
            },
            add_counts,
        );
        for s in (1..selections).filter(|&s| copied(s, windows)) {
            high.copy_within((s - 1) * BINS..s * BINS, s * BINS);
        }
        high
    };
    let Some(sample) = sample(stream) else {
        let high = count((0..stream.chunks()).map(|c| (c, None)).collect(), &[]);
        return cuts_counted(stream, which, &high, counts, None, same_keys, key);
    };
    let high = count(sample.iter().map(|&c| (c, None)).collect(), &[]);
    let n = stream.len() as f64;
    let windows = high
        .chunks(BINS)
        .zip(counts)
        .map(|(raw, count)| {
            // The count is asked about the sample's histogram scaled up.
            let h = totals(raw, 1).pop()?;
            let scale = n / h.iter().sum::<u64>().max(1) as f64;
            let scaled: Vec<u64> = h.iter().map(|&c| (c as f64 * scale) as u64).collect();
            let zeros = (zeros(raw, 0) as f64 * scale) as u64;
            guess(&h, count(&scaled, zeros) as f64 / n)
        })
        .collect();
    let mut kept = Kept::new(stream, windows);
    let (windows, slots) = kept.slots();
    let windows = windows.to_vec();
    let rest = count(
        slots.into_iter().map(|(c, s)| (c, Some(s))).collect(),
        &windows,
    );
    let high = add_counts(high, rest);
    cuts_counted(stream, which, &high, counts, Some(&kept), same_keys, key)
}

/// Per-thread histograms added up.
pub fn add_counts(mut a: Vec<u32>, b: Vec<u32>) -> Vec<u32> {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    a
}

/// [`cuts`] after the first pass: `high` holds each selection's counts of
/// the keys' high digits ([`BINS`] each, by [`count_high`], or past the
/// sample by [`count_high_keeping`]), made in a pass the caller had to make
/// anyway; `kept`, when that pass sampled first, each selection's window
/// and the keys it kept inside it outside the sample, so that only the
/// chunks they do not answer for are visited again; `same_keys` as for
/// [`cuts`].
pub fn cuts_counted(
    stream: &Stream,
    which: &[usize],
    high: &[u32],
    counts: &[Count],
    kept: Option<&Kept>,
    same_keys: &[bool],
    key: &(impl Fn(usize, usize, &[&[f32]], &mut [u32]) + Sync),
) -> Vec<Cut> {
    let selections = counts.len();
    // The selection whose keys selection s uses.
    let owner = |mut s: usize| {
        while same_keys.get(s) == Some(&true) && s > 0 {
            s -= 1;
        }
        s
    };
    let locate_all = |high: &[u32]| {
        let zero: Vec<u64> = (0..selections).map(|s| zeros(high, s)).collect();
        let totals = totals(high, selections);
        // Per selection: its k, and the digit and count above it where the
        // cut falls inside the keys.
        let located: Vec<Option<(usize, usize, u64)>> = counts
            .iter()
            .zip(&totals)
            .zip(&zero)
            .map(|((count, h), &zero)| {
                let k = count(h, zero);
                let (hi, above) = locate(h, k as u64).filter(|_| k > 0)?;
                Some((k, hi, above))
            })
            .collect();
        (zero, totals, located)
    };
    let (mut zero, mut high_totals, mut located) = locate_all(high);
    // Outside its window a selection's histogram lumps the chunks past the
    // sample into one bin each side (`count_high_keeping`): where the cut
    // falls there, the sample guessed wrong, and its keys are counted again
    // in full over every chunk.
    let window = |s: usize| kept.and_then(|kept| kept.windows[s]);
    let lumped = |s: usize| {
        let cut = located[s].map(|(_, hi, _)| hi);
        matches!((window(s), cut), (Some(w), Some(hi)) if !w.contains(hi))
    };
    let again: Vec<usize> = (0..selections).filter(|&s| lumped(s)).collect();
    if !again.is_empty() {
        let all = (0..stream.chunks()).map(|c| (c, ())).collect();
        let fresh = stream.fold(
            which,
            all,
            || vec![0u32; selections * BINS],
            |mut h, c, (), chunk| {
                with_keys(stream.chunk_len(c), |keys| {
                    let mut made = None;
                    for &s in &again {
                        if made != Some(owner(s)) {
                            key(s, c, chunk, keys);
                            made = Some(owner(s));
                        }
                        count_high(&mut h[s * BINS..(s + 1) * BINS], keys);
                    }
                });
                h
            },
            add_counts,
        );
        let mut high = high.to_vec();
        for &s in &again {
            let bins = s * BINS..(s + 1) * BINS;
            high[bins.clone()].copy_from_slice(&fresh[bins]);
        }
        (zero, high_totals, located) = locate_all(&high);
    }
    let high = high_totals;
    // Whether selection s's bucket is among the kept keys.
    let hit = |s: usize| {
        let cut = located[s].map(|(_, hi, _)| hi);
        matches!((window(s), cut), (Some(w), Some(hi)) if w.contains(hi))
    };
    let hits: Vec<bool> = (0..selections).map(hit).collect();
    let revisit = |s: usize, c: usize| located[s].is_some() && (!hits[s] || sampled(c));
    let chunks: Vec<usize> = (0..stream.chunks())
        .filter(|&c| (0..selections).any(|s| revisit(s, c)))
        .collect();
    let revisited = stream.map_over(which, &chunks, |c, chunk| {
        with_keys(stream.chunk_len(c), |keys| {
            let mut made = None;
            (0..selections)
                .map(|s| match located[s] {
                    Some((_, hi, _)) if revisit(s, c) => {
                        if made != Some(owner(s)) {
                            key(s, c, chunk, keys);
                            made = Some(owner(s));
                        }
                        in_bucket(keys, hi)
                    }
                    _ => Vec::new(),
                })
                .collect::<Vec<_>>()
        })
    });
    let mut lows: Vec<Vec<Vec<u16>>> = vec![Vec::new(); stream.chunks()];
    for (&c, l) in chunks.iter().zip(revisited) {
        lows[c] = l;
    }
    if let Some(kept) = kept {
        for (c, lows) in lows.iter_mut().enumerate() {
            lows.resize(selections, Vec::new());
            for (s, at) in located.iter().enumerate() {
                if let Some((_, hi, _)) = *at
                    && !revisit(s, c)
                {
                    lows[s] = kept.keys[c][s]
                        .iter()
                        .filter(|&&k| (k >> 16) as usize == hi)
                        .map(|&k| k as u16)
                        .collect();
                }
            }
        }
    }
    counts
        .iter()
        .zip(&high)
        .zip(&located)
        .enumerate()
        .map(|(s, ((count, h), at))| {
            let Some((k, hi, above_hi)) = *at else {
                return if count(h, zero[s]) == 0 {
                    Cut::Nothing
                } else {
                    Cut::Everything
                };
            };
            let mut low = vec![0u64; 1 << 16];
            lows.iter()
                .flat_map(|chunk| &chunk[s])
                .for_each(|&l| low[usize::from(l)] += 1);
            let Some((lo, above_lo)) = locate(&low, k as u64 - above_hi) else {
                // The bucket holds the k-th largest by the first pass's count:
                // only a key function that changed its keys gets here.
                debug_assert!(
                    false,
                    "the second pass found fewer keys in the bucket than the first"
                );
                return Cut::Everything;
            };
            let threshold = ((hi as u32) << 16) | lo as u32;
            let mut running = 0;
            let chunks = lows
                .iter()
                .map(|chunk| {
                    let ties = chunk[s].iter().filter(|&&l| usize::from(l) == lo).count();
                    running += ties;
                    (running - ties, ties)
                })
                .collect();
            Cut::At {
                threshold,
                ties_wanted: k - (above_hi + above_lo) as usize,
                chunks,
            }
        })
        .collect()
}

/// The low digits of the keys whose high digit is `hi`, in order.
fn in_bucket(keys: &[u32], hi: usize) -> Vec<u16> {
    let mut kept = Vec::new();
    let hi = hi as u32;
    Window { lo: hi, hi }.keep(keys, &mut kept);
    kept.into_iter().map(|k| k as u16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TensorDtype;
    use crate::merge::kernels::order_key;
    use crate::stream::CHUNK;

    /// Which of `values` (eligible where `eligible`) are among the `k`
    /// largest, by [`cuts`] over an f32 stream.
    fn top_k(values: &[f32], eligible: impl Fn(usize) -> bool + Sync, k: usize) -> Vec<bool> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let stream = Stream::new(vec![(&bytes, TensorDtype::F32)]).expect("f32");
        let key = |start: usize, chunk: &[f32], keys: &mut [u32]| {
            for (j, (key, v)) in keys.iter_mut().zip(chunk).enumerate() {
                *key = if eligible(start + j) {
                    order_key(*v).max(1)
                } else {
                    0
                };
            }
        };
        let counts: Vec<Count> = vec![Box::new(move |h: &[u64], zeros: u64| {
            k.min((h.iter().sum::<u64>() - zeros) as usize)
        })];
        let cut = &cuts(&stream, &[0], &counts, &[], &|_, c, chunk, keys| {
            key(c * CHUNK, chunk[0], keys)
        })[0];
        let mut picked = Vec::new();
        for c in 0..stream.chunks() {
            let range = c * CHUNK..(c * CHUNK + stream.chunk_len(c));
            let mut keys = vec![0; range.len()];
            key(range.start, &values[range], &mut keys);
            let mut selected = cut.rule(c).selector();
            picked.extend(keys.iter().map(|k| *k > 0 && selected(*k)));
        }
        picked
    }

    #[test]
    fn top_k_breaks_ties_by_index() {
        let values = [1.0, 3.0, 3.0, 2.0, 3.0];
        assert_eq!(
            top_k(&values, |_| true, 2),
            vec![false, true, true, false, false]
        );
        assert_eq!(
            top_k(&values, |i| i != 1, 2),
            vec![false, false, true, false, true]
        );
        assert_eq!(
            top_k(&values, |_| true, 4),
            vec![false, true, true, true, true]
        );
        assert_eq!(top_k(&values, |_| true, 9), vec![true; 5]);
        assert_eq!(top_k(&values, |_| true, 0), vec![false; 5]);
    }

    #[test]
    fn top_k_ties_across_chunks() {
        // Equal values everywhere: the lowest indices win, across chunk borders.
        let n = CHUNK * 3 + 17;
        let values = vec![0.5f32; n];
        let k = CHUNK + 5;
        let s = top_k(&values, |_| true, k);
        assert!(s[..k].iter().all(|x| *x) && s[k..].iter().all(|x| !*x));
    }

    /// Sampled selections (64 chunks and more) agree with sorting: when
    /// the sample guesses the cut's digits (only the sample is revisited),
    /// when it guesses wrong (sampled chunks a little unlike the others:
    /// every chunk is counted again in full, then revisited), and when it
    /// cannot guess (sampled chunks far from the others: no window, every
    /// chunk is revisited).
    #[test]
    fn sampled_select_agrees_with_sorting_and_revisits_only_the_sample() {
        let n = 64 * CHUNK + 333;
        let chunks = n.div_ceil(CHUNK);
        let sample = (0..chunks).filter(|&c| sampled(c)).count();
        for (shift, expected_revisits) in [(0.0, sample), (3.0, 2 * chunks), (1000.0, chunks)] {
            let values: Vec<f32> = (0..n)
                .map(|i| {
                    let v = ((i * 7919) % 100_003) as f32 / 1000.0 - 40.0;
                    if sampled(i / CHUNK) { v + shift } else { v }
                })
                .collect();
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let stream = Stream::new(vec![(&bytes, TensorDtype::F32)]).expect("f32");
            let k = n / 3;
            let counts: Vec<Count> = vec![Box::new(move |_: &[u64], _| k)];
            let visits = std::sync::atomic::AtomicUsize::new(0);
            let cut = &cuts(&stream, &[0], &counts, &[], &|_, _, chunk, keys| {
                visits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for (key, v) in keys.iter_mut().zip(chunk[0]) {
                    *key = order_key(*v).max(1);
                }
            })[0];
            let revisited = visits.into_inner() - chunks;
            assert_eq!(revisited, expected_revisits, "shift: {shift}");
            assert!(
                picked(cut, &values, &stream) == largest(&values, k),
                "shift: {shift}"
            );
        }
    }

    /// Two cuts of the same keys (breadcrumbs'): each has its own window,
    /// and where the sample guesses both, only the sample is revisited.
    #[test]
    fn shared_keys_are_counted_for_each_window() {
        let n = 64 * CHUNK + 333;
        let chunks = n.div_ceil(CHUNK);
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 100_003) as f32 / 1000.0 - 40.0)
            .collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let stream = Stream::new(vec![(&bytes, TensorDtype::F32)]).expect("f32");
        let ks = [n / 3, 2 * n / 3];
        let counts: Vec<Count> = ks
            .iter()
            .map(|&k| -> Count { Box::new(move |_: &[u64], _| k) })
            .collect();
        let visits = std::sync::atomic::AtomicUsize::new(0);
        let found = cuts(
            &stream,
            &[0],
            &counts,
            &[false, true],
            &|_, _, chunk, keys| {
                visits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for (key, v) in keys.iter_mut().zip(chunk[0]) {
                    *key = order_key(*v).max(1);
                }
            },
        );
        let sample = (0..chunks).filter(|&c| sampled(c)).count();
        assert_eq!(visits.into_inner(), chunks + sample);
        for (cut, k) in found.iter().zip(ks) {
            assert!(
                picked(cut, &values, &stream) == largest(&values, k),
                "k {k}"
            );
        }
    }

    /// Which of `values` (the f32 stream's) `cut` selects.
    fn picked(cut: &Cut, values: &[f32], stream: &Stream) -> Vec<bool> {
        let mut picked = Vec::with_capacity(values.len());
        for c in 0..stream.chunks() {
            let mut selected = cut.rule(c).selector();
            let range = c * CHUNK..(c * CHUNK + stream.chunk_len(c));
            picked.extend(values[range].iter().map(|v| selected(order_key(*v).max(1))));
        }
        picked
    }

    /// The `k` largest of `values` by sorting, ties to the lower index.
    fn largest(values: &[f32], k: usize) -> Vec<bool> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        let mut expected = vec![false; values.len()];
        order[..k].iter().for_each(|&i| expected[i] = true);
        expected
    }

    #[test]
    fn guessed_windows_hold_the_cut_near_both_ends() {
        // 1000 keys in each of the digits 100..200.
        let mut h = vec![0u64; 1 << 16];
        h[100..200].iter_mut().for_each(|c| *c = 1000);
        for (fraction, cut) in [(0.005, 199), (0.5, 150), (0.995, 100)] {
            let w = guess(&h, fraction).expect("a narrow window");
            assert!(w.contains(cut), "{fraction}: {w:?}");
            assert!(w.hi - w.lo <= 4, "{fraction}: {w:?}");
        }
        assert!(guess(&h, 0.0).is_none());
        assert!(guess(&h, 1.0).is_none());
    }

    #[test]
    fn radix_select_agrees_with_sorting() {
        // Many ties and negative values, and ineligible positions.
        let n = (1 << 20) + 333;
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 - 400.0).collect();
        let mut order: Vec<usize> = (0..n).filter(|i| i % 3 != 0).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        let m = order.len();
        for k in [1, 5000, m / 2, m - 1, m, m + 5] {
            let picked = top_k(&values, |i| i % 3 != 0, k);
            let mut expected = vec![false; n];
            order[..k.min(m)].iter().for_each(|&i| expected[i] = true);
            assert!(picked == expected, "k = {k}");
        }
    }
}
