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
            // MADV_PAGEOUT skips pages another process maps too (another llama.cpp over the same
            // model file): those stay in our resident set. Where the range is provably a read-only
            // shared file mapping, drop our mapping of them as well.
            if shared_read_only_file(start, end) {
                // SAFETY: every page of the range belongs to a read-only MAP_SHARED file mapping
                // (checked just above in /proc/self/maps): MADV_DONTNEED only unmaps them from
                // this process, the page cache keeps their contents and the next touch maps them
                // again. (On anonymous or private memory it would zero-fill; never used there.)
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
                };
            }
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

/// Is every page of `[start, end)` inside a file-backed, read-only, shared mapping (`r--s` in
/// `/proc/self/maps`, with an inode)? False when anything is unknown.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn shared_read_only_file(start: usize, end: usize) -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    shared_read_only_in(&maps, start, end)
}

/// [`shared_read_only_file`] over the text of a maps file (ranges sorted, as the kernel writes them).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn shared_read_only_in(maps: &str, start: usize, end: usize) -> bool {
    let mut covered = start;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        if b <= covered || a >= end {
            continue;
        }
        if a > covered || !perms.starts_with("r-") || perms.as_bytes().get(3) != Some(&b's') {
            return false;
        }
        if inode == "0" {
            return false;
        }
        covered = b;
        if covered >= end {
            return true;
        }
    }
    false
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

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_shared_file_mappings_qualify() {
        let maps = "1000-3000 r--s 00000000 08:01 42 /m.gguf\n\
                    3000-5000 r--s 00002000 08:01 42 /m.gguf\n\
                    5000-6000 rw-p 00000000 00:00 0 \n\
                    6000-7000 r--p 00000000 08:01 43 /lib.so\n\
                    8000-9000 r--s 00000000 08:01 42 /m.gguf\n";
        assert!(shared_read_only_in(maps, 0x1000, 0x5000));
        assert!(shared_read_only_in(maps, 0x2000, 0x4000));
        assert!(!shared_read_only_in(maps, 0x2000, 0x5001)); // anonymous
        assert!(!shared_read_only_in(maps, 0x6000, 0x7000)); // private
        assert!(!shared_read_only_in(maps, 0x7000, 0x9000)); // a hole
        assert!(!shared_read_only_in(maps, 0xa000, 0xb000)); // unmapped
    }

    #[test]
    fn page_out_keeps_file_and_anonymous_contents() {
        // A shared read-only file mapping (as llama.cpp maps a model): contents survive.
        let path = std::env::temp_dir().join(format!("ggml-coreml-os-{}", std::process::id()));
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh read-only shared mapping of a file we own, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                data.len(),
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the mapping holds data.len() readable bytes.
        let m = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), data.len()) };
        assert_eq!(m, &data[..]);
        assert!(shared_read_only_file(p as usize, p as usize + data.len()));
        assert_eq!(page_out(p as usize, data.len()), data.len());
        assert_eq!(m, &data[..]);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p, data.len()) };
        let _ = std::fs::remove_file(&path);
    }

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
