//! Row splitting for the `*_par` variants: scoped threads over disjoint row ranges.

use std::ops::Range;

/// Splits `0..n` into at most `threads` contiguous ranges of near-equal length (none empty).
pub(crate) fn row_ranges(n: usize, threads: usize) -> Vec<Range<usize>> {
    let parts = threads.clamp(1, n.max(1));
    let (base, extra) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// Cuts `data` into consecutive pieces of `lens[i] * unit` elements.
pub(crate) fn split_by<'a, T>(
    mut data: &'a mut [T],
    ranges: &[Range<usize>],
    unit: usize,
) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (head, tail) = std::mem::take(&mut data).split_at_mut(r.len() * unit);
        out.push(head);
        data = tail;
    }
    out
}

/// Runs `work(rows, piece_a, piece_b, piece_c)` for each row range, on scoped threads when more than one.
pub(crate) fn for_row_ranges<A: Send, B: Send, C: Send>(
    ranges: &[Range<usize>],
    a: (&mut [A], usize),
    b: (&mut [B], usize),
    c: (&mut [C], usize),
    work: impl Fn(Range<usize>, &mut [A], &mut [B], &mut [C]) + Sync,
) {
    if ranges.len() <= 1 {
        if let Some(r) = ranges.first() {
            work(r.clone(), a.0, b.0, c.0);
        }
        return;
    }
    let pa = split_by(a.0, ranges, a.1);
    let pb = split_by(b.0, ranges, b.1);
    let pc = split_by(c.0, ranges, c.1);
    let work = &work;
    std::thread::scope(|s| {
        for (((r, a), b), c) in ranges.iter().zip(pa).zip(pb).zip(pc) {
            let r = r.clone();
            s.spawn(move || work(r, a, b, c));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_rows_once() {
        for n in 0..20 {
            for t in 0..6 {
                let rs = row_ranges(n, t);
                assert!(rs.len() <= t.max(1));
                let mut next = 0;
                for r in &rs {
                    assert_eq!(r.start, next);
                    assert!(!r.is_empty());
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
