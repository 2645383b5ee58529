//! A hugetlb memfd mapping for tests, unmapped and closed on drop so no
//! hugepage outlives the test.
#![allow(dead_code)]

use std::os::fd::OwnedFd;

use memplane::hugepages::hugetlb_memfd_flags;
use memplane::PageSize;
use rustix::fs::{fallocate, memfd_create, FallocateFlags};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

pub struct HugeMap {
    ptr: *mut std::ffi::c_void,
    len: usize,
    page: usize,
    _fd: OwnedFd,
}

impl HugeMap {
    /// `pages` pages of `size`: memfd, fallocate (reserves and allocates the
    /// pages under the calling thread's policy), mmap shared.
    pub fn new(size: PageSize, pages: usize) -> HugeMap {
        let page = size.bytes() as usize;
        let len = page * pages;
        let fd = memfd_create("memplane-test", hugetlb_memfd_flags(size)).unwrap();
        fallocate(&fd, FallocateFlags::empty(), 0, len as u64).unwrap();
        // SAFETY: a new shared mapping of our own memfd at an address the
        // kernel chooses (no MAP_FIXED) aliases no existing memory.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .unwrap();
        HugeMap {
            ptr,
            len,
            page,
            _fd: fd,
        }
    }

    pub fn addr(&self) -> usize {
        self.ptr as usize
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Writes one byte into every page.
    pub fn touch(&self) {
        for off in (0..self.len).step_by(self.page) {
            // SAFETY: `off < len`, inside our writable mapping, which no
            // reference points into.
            unsafe { self.ptr.cast::<u8>().add(off).write_volatile(1) };
        }
    }
}

impl Drop for HugeMap {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; nothing borrows it.
        unsafe { munmap(self.ptr, self.len) }.unwrap();
    }
}
