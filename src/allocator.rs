//! The global allocator of the binary (src/main.rs): mimalloc, asked the
//! way its fast path wants.
//!
//! The `mimalloc` crate's `GlobalAlloc` passes every allocation to
//! `mi_malloc_aligned`, even the word-aligned ones that are nearly all of
//! Rust's. In mimalloc v3 that call takes the fast path only while its size
//! class has a free block at hand; when the class's free list runs out, a
//! size that is not a power of two (24, 40, 48, … bytes) is served by
//! over-allocating from a larger class, and the class's own freed blocks are
//! never gathered again, so from then on every allocation of that size pays
//! the slow path (about 150 instructions) and a larger block. Under callgrind
//! that was 2.3 allocations of each proxied request, and allocation as a
//! whole about 4,500 of its ~24,400 instructions.
//!
//! Every mimalloc block is at least word-aligned (its size classes are
//! multiples of the word size, and a page's first block is 16-aligned), so
//! a layout whose alignment is at most a word goes to plain `mi_malloc`;
//! larger alignments still go to `mi_malloc_aligned`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment `mi_malloc` guarantees for every size.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc, with word-aligned layouts on its plain entry points.
pub struct MiMalloc;

// SAFETY: every pointer returned comes from mimalloc with at least the
// layout's alignment (plain calls only for alignments up to a word, which
// every mimalloc block has), and is freed or resized only by mimalloc.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size up to 4 KiB and some larger, at every alignment up to a
    /// page, allocated, zeroed, grown and shrunk: each pointer has its
    /// layout's alignment, and the bytes survive a resize.
    #[test]
    fn every_pointer_has_its_layouts_alignment() {
        let sizes = (1..=4096).chain([8191, 65536, 1 << 20, (4 << 20) + 3]);
        let mut live = Vec::new();
        for size in sizes {
            for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = MiMalloc.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "{layout:?}");
                    p.write_bytes(0xA5, size);
                    let z = MiMalloc.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed {layout:?}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    let grown = MiMalloc.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "grown {layout:?}");
                    assert!(std::slice::from_raw_parts(grown, size)
                        .iter()
                        .all(|&b| b == 0xA5));
                    let bigger = Layout::from_size_align(size * 3, align).unwrap();
                    let shrunk = MiMalloc.realloc(grown, bigger, size.div_ceil(2));
                    assert_eq!(shrunk as usize % align, 0, "shrunk {layout:?}");
                    assert!(std::slice::from_raw_parts(shrunk, size.div_ceil(2))
                        .iter()
                        .all(|&b| b == 0xA5));
                    let half = Layout::from_size_align(size.div_ceil(2), align).unwrap();
                    // Some kept alive, so later ones come from partly used pages.
                    if size % 7 == 0 {
                        live.push((shrunk, half));
                    } else {
                        MiMalloc.dealloc(shrunk, half);
                    }
                    MiMalloc.dealloc(z, layout);
                }
            }
        }
        for (p, layout) in live {
            unsafe { MiMalloc.dealloc(p, layout) };
        }
    }
}
