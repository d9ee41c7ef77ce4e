#![allow(unsafe_code)]
//! SQLite's own allocations through mimalloc, the allocator the rest of the server uses.
//!
//! SQLite allocates with the system's `malloc` unless told otherwise before it starts. Every
//! writer's turn is a savepoint whose journal SQLite keeps in memory in blocks of 1 KiB
//! (`temp_store = memory`), a dozen allocations per page a writer changes; glibc's `malloc` and
//! `free` under SQLite were ~0.5 M instructions per run, inside the write lock. Through mimalloc
//! (with `SQLITE_DEFAULT_MEMSTATUS=0`, `.cargo/config.toml`) the server runs 6.3 % fewer
//! instructions per run and the write lock is held 7.8 % less (BENCHMARKS.md, "SQLite's
//! allocations through mimalloc").
//!
//! [`install`] hands SQLite mimalloc's functions (`SQLITE_CONFIG_MALLOC`). SQLite accepts them
//! only before it starts (its first connection in the process), so the store calls it before it
//! connects; later calls return the first one's result. This is the crate's only `unsafe` code:
//! FFI calls with no safe wrapper in the libraries we use.

use libmimalloc_sys as mi;
use libsqlite3_sys as ffi;
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

// In mimalloc's library (linked through `libmimalloc_sys`), outside the bindings that crate
// builds by default.
unsafe extern "C" {
    fn mi_usable_size(p: *const c_void) -> usize;
    fn mi_good_size(size: usize) -> usize;
}

unsafe extern "C" fn x_malloc(n: c_int) -> *mut c_void {
    // SQLite never asks for a negative size; treat one as a failed allocation.
    match usize::try_from(n) {
        Ok(n) => unsafe { mi::mi_malloc(n) },
        Err(_) => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn x_free(p: *mut c_void) {
    unsafe { mi::mi_free(p) }
}

unsafe extern "C" fn x_realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    match usize::try_from(n) {
        Ok(n) => unsafe { mi::mi_realloc(p, n) },
        Err(_) => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn x_size(p: *mut c_void) -> c_int {
    let size = unsafe { mi_usable_size(p) };
    c_int::try_from(size).unwrap_or(c_int::MAX)
}

unsafe extern "C" fn x_roundup(n: c_int) -> c_int {
    let Ok(wanted) = usize::try_from(n) else {
        return n;
    };
    let good = unsafe { mi_good_size(wanted) };
    c_int::try_from(good).unwrap_or(n)
}

unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_shutdown(_: *mut c_void) {}

/// What [`install`] did: `Ok` once SQLite took mimalloc's functions, else SQLite's result code
/// (`SQLITE_MISUSE`: SQLite had already started in this process, with the system's `malloc`).
static INSTALLED: OnceLock<Result<(), c_int>> = OnceLock::new();

/// Give SQLite mimalloc's allocation functions, once per process, before its first connection.
pub fn install() -> Result<(), c_int> {
    *INSTALLED.get_or_init(|| {
        let methods = ffi::sqlite3_mem_methods {
            xMalloc: Some(x_malloc),
            xFree: Some(x_free),
            xRealloc: Some(x_realloc),
            xSize: Some(x_size),
            xRoundup: Some(x_roundup),
            xInit: Some(x_init),
            xShutdown: Some(x_shutdown),
            pAppData: std::ptr::null_mut(),
        };
        // SQLite copies the structure. It refuses (SQLITE_MISUSE) once it has started.
        let rc = unsafe {
            ffi::sqlite3_config(
                ffi::SQLITE_CONFIG_MALLOC,
                &methods as *const ffi::sqlite3_mem_methods,
            )
        };
        if rc == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(rc)
        }
    })
}

/// Whether SQLite allocates through mimalloc in this process (see [`install`]).
pub fn installed() -> bool {
    matches!(INSTALLED.get(), Some(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        fn mi_is_in_heap_region(p: *const c_void) -> bool;
    }

    /// A store's SQLite allocates through mimalloc: its memory comes from mimalloc's heap, and
    /// sizes round as mimalloc's do.
    #[tokio::test]
    async fn sqlite_allocates_through_mimalloc() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = crate::store::test_store(dir.path()).await;
        assert!(installed(), "install() ran before SQLite started");
        assert_eq!(install(), Ok(()), "a second call changes nothing");
        // Memory SQLite hands out is mimalloc's: mimalloc knows its size, and SQLite's size of
        // it is mimalloc's usable size.
        unsafe {
            let p = ffi::sqlite3_malloc(100);
            assert!(!p.is_null());
            assert!(mi_is_in_heap_region(p));
            assert_eq!(ffi::sqlite3_msize(p) as usize, mi_usable_size(p));
            ffi::sqlite3_free(p);
        }
        // And the store works on it.
        assert!(store.head_sequence().await.expect("head") >= 0);
    }
}
