//! Operating-system calls on memory the backend borrows (llama.cpp's mapping of the model file).

/// `GGML_COREML_RELEASE_RAW=0`: keep the raw weight pages of prepared weights resident (comparisons).
pub fn release_enabled() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("GGML_COREML_RELEASE_RAW").map_or(true, |v| v != "0"))
}

/// Asks the kernel to reclaim the whole pages inside `[addr, addr + len)`, as stock llama.cpp's loader
/// does with the parts of the mapping no CPU tensor uses, and to read them back page by page
/// (`MADV_RANDOM`) if anything touches them again. Returns the bytes advised (0 when the range
/// holds no whole page, the call failed, or the platform has no such advice).
///
/// Linux `MADV_PAGEOUT` never changes what the range reads: clean file-backed pages are dropped and
/// read again from the file on the next touch, dirty ones written back first, anonymous ones swapped
/// (or left where they are without swap). The kernel pages out file-backed pages only for callers that
/// could open the file for writing, and only pages no other process maps; otherwise it is a no-op.
/// Apple: clean file-backed pages do not count in an app's footprint, so nothing is done there (a
/// device question, docs/memory.md).
pub fn page_out(addr: usize, len: usize) -> usize {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let page = page_size();
        let Some(end) = addr.checked_add(len) else {
            return 0;
        };
        let (start, end) = (addr.div_ceil(page).saturating_mul(page), end / page * page);
        if start == 0 || end <= start {
            return 0;
        }
        // SAFETY: advice only, on whole pages inside a range the caller says is mapped host memory
        // that outlives this call; MADV_PAGEOUT is data-preserving for every kind of mapping (above),
        // unlike MADV_DONTNEED, which would zero-fill anonymous memory.
        let r =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
        if r == 0 {
            // Whatever still reads the range (a fallback node; with a tied output head, the token
            // embedding's GET_ROWS over the same bytes) faults in only the pages it touches, not the
            // read-around window of each fault (which brought back most of a released embedding).
            // SAFETY: advice only, on the same range; it changes no contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_RANDOM) };
            return end - start;
        }
        static WARNED: std::sync::Once = std::sync::Once::new();
        let err = std::io::Error::last_os_error();
        WARNED.call_once(|| {
            crate::log::info(&format!(
                "madvise(MADV_PAGEOUT) failed ({err}); raw weight pages stay resident"
            ))
        });
        0
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = (addr, len);
        0
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn page_size() -> usize {
    static P: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *P.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 { p as usize } else { 4096 }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_out_keeps_anonymous_contents() {
        let v: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let n = page_out(v.as_ptr() as usize + 1, v.len() - 1);
        assert!(n <= v.len());
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        assert_eq!(page_out(0, 0), 0);
        assert_eq!(page_out(usize::MAX - 10, 100), 0);
    }
}
