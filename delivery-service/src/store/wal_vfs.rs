//! A SQLite VFS for the store's writer connection: the platform's default VFS, except that the
//! WAL frames a transaction writes reach the file in one `write` call instead of two per page.
//!
//! Why: SQLite writes each WAL frame as two calls, its 24-byte header and then its page, at
//! offsets that straddle the OS's pages. Measured on the benchmark VM (docs/benchmarks.md,
//! figure 5), two thirds of the writer thread's time went to those calls: about 3 us per frame,
//! against about 1 us when a batch's frames are written with one call.
//!
//! How it stays correct:
//! - Only writes to a WAL file are held back, and only while they continue each other
//!   (contiguous offsets). Any other call on the WAL file (read, size, sync, truncate, file
//!   control, close) first writes what is held, so SQLite never observes the difference.
//! - A commit's frames are written before the commit can be seen: the shim writes what it holds
//!   as soon as the page of the commit frame (the frame whose header carries a database size)
//!   arrives, inside that `xWrite`, so a failure fails the commit as it would without the shim.
//!   SQLite then publishes the commit in the shared-memory index, behind a memory barrier
//!   (`xShmBarrier` on the database file); the barrier, and every shared-memory lock change,
//!   writes anything still held for the database's WAL (frames of a transaction that rewrote
//!   checksums, or spilled before rolling back) before it returns.
//! - A write that fails there cannot be reported to SQLite (the barrier returns nothing): the
//!   WAL's later calls all fail, and [`deferred_write_failure`] tells the store, which stops
//!   acknowledging and fails (as after a failed fsync).
//!
//! The barrier finds the WAL through the thread: SQLite writes a commit's frames and publishes
//! them in one call of the connection, on one thread, which remembers the WAL it left bytes
//! held in. The store's writer is the only connection that uses this VFS; its readers and its
//! checkpointer use the default VFS.
//!
//! The held bytes are copies: SQLite reuses its frame-header buffer and may change a cached
//! page as soon as `xWrite` returns.

// SAFETY: this module is the workspace's one use of `unsafe`: a VFS is C callbacks over memory
// SQLite owns. Every function here follows the contract of `sqlite3_vfs` and
// `sqlite3_io_methods` (https://sqlite.org/c3ref/io_methods.html); nothing in it may panic
// (a panic cannot unwind through SQLite).
#![allow(unsafe_code)]

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{CStr, c_int, c_void};
use std::mem::offset_of;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock};

use rusqlite::ffi;

/// The name the VFS is registered under (`Connection::open_with_flags_and_vfs`).
pub const VFS_NAME: &CStr = c"mlschat-wal-gather";

/// Held bytes past which they are written even before the commit frame (a transaction larger
/// than this, such as a migration, writes in pieces of about this size).
const MAX_HELD_BYTES: usize = 1 << 20;

/// The most one write call of the default VFS takes: the unix VFS writes at most 128 KiB - 1
/// bytes per call (`seekAndWriteFd` masks the length with 0x1ffff).
const MAX_WRITE_BYTES: usize = 0x1ffff;

/// The size of a WAL frame header; bytes 4..8 hold the database size for a commit frame.
const FRAME_HEADER_BYTES: c_int = 24;

/// Registers the VFS (once per process) and returns its name, or SQLite's error code.
pub fn register() -> Result<&'static CStr, c_int> {
    static REGISTERED: OnceLock<c_int> = OnceLock::new();
    let rc = *REGISTERED.get_or_init(|| {
        // SAFETY: `sqlite3_vfs_find(NULL)` returns the default VFS, which SQLite never frees.
        // The new VFS is leaked: SQLite keeps a pointer to it for the life of the process.
        unsafe {
            let initialized = ffi::sqlite3_initialize();
            if initialized != ffi::SQLITE_OK {
                return initialized;
            }
            let default = ffi::sqlite3_vfs_find(ptr::null());
            if default.is_null() {
                return ffi::SQLITE_ERROR;
            }
            let Ok(inner_size) = usize::try_from((*default).szOsFile) else {
                return ffi::SQLITE_ERROR;
            };
            let Ok(size) = c_int::try_from(offset_of!(ShimFile, inner) + inner_size) else {
                return ffi::SQLITE_ERROR;
            };
            let _ = DEFAULT_VFS.set(VfsPointer(default));
            let mut vfs = *default;
            vfs.szOsFile = size;
            vfs.pNext = ptr::null_mut();
            vfs.zName = VFS_NAME.as_ptr();
            vfs.xOpen = Some(shim_open);
            // Every other method is the default VFS's own: it reads nothing from the VFS
            // object but `mxPathname` and `pAppData`, copied above.
            ffi::sqlite3_vfs_register(Box::into_raw(Box::new(vfs)), 0)
        }
    });
    if rc == ffi::SQLITE_OK {
        Ok(VFS_NAME)
    } else {
        Err(rc)
    }
}

/// The error code of a WAL write the shim could not report to SQLite, for the WAL at
/// `wal_name` (the database's full name as SQLite knows it, with `-wal`): once set, the WAL's
/// published frames may not all be in the file.
pub fn deferred_write_failure(wal_name: &[u8]) -> Option<c_int> {
    if !ANY_DEFERRED_FAILURE.load(Ordering::Acquire) {
        return None;
    }
    let registry = lock(&REGISTRY);
    registry
        .get(wal_name)?
        .iter()
        .find_map(|buffer| lock(&buffer.held).failure)
}

/// Write calls SQLite made on the WAL at `wal_name`, and write calls the shim made to the file
/// in their place (for tests).
#[cfg(test)]
pub fn write_counts(wal_name: &[u8]) -> Option<(u64, u64)> {
    let registry = lock(&REGISTRY);
    let buffers = registry.get(wal_name)?;
    Some(buffers.iter().fold((0, 0), |(asked, made), buffer| {
        (
            asked + buffer.writes_asked.load(Ordering::Relaxed),
            made + buffer.writes_made.load(Ordering::Relaxed),
        )
    }))
}

struct VfsPointer(*mut ffi::sqlite3_vfs);
// SAFETY: the default VFS is a static object of SQLite's, used from any thread.
unsafe impl Send for VfsPointer {}
unsafe impl Sync for VfsPointer {}

static DEFAULT_VFS: OnceLock<VfsPointer> = OnceLock::new();

/// Open WAL files by name, for [`deferred_write_failure`].
static REGISTRY: LazyLock<Mutex<WalsByName>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// A WAL's name as SQLite gives it to `xOpen`, and the buffers of its open file objects.
type WalsByName = HashMap<Vec<u8>, Vec<Arc<WalBuffer>>>;
/// WAL files holding bytes: the barrier's fast path when none does.
static HOLDING: AtomicUsize = AtomicUsize::new(0);
static ANY_DEFERRED_FAILURE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The WAL in which this thread's last write started holding bytes: the barrier's way
    /// from the database file to its WAL (see the module's documentation).
    static HELD_BY_THIS_THREAD: Cell<Option<Arc<WalBuffer>>> = const { Cell::new(None) };
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic cannot happen while one of these is held (nothing here panics); if one did,
    // the data is still consistent bytes and counters.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The file object SQLite allocates (`szOsFile` bytes): ours first, the default VFS's after.
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    role: *mut Role,
    /// The default VFS's file object; it is `szOsFile` of the default VFS long.
    inner: ffi::sqlite3_file,
}

enum Role {
    /// The WAL: its writes are gathered.
    Wal {
        name: Vec<u8>,
        buffer: Arc<WalBuffer>,
    },
    /// A main database file: its barrier writes what its WAL holds.
    Database {
        wal_name: Vec<u8>,
    },
    Other,
}

struct WalBuffer {
    /// The WAL's name, as SQLite gave it to `xOpen`.
    name: Vec<u8>,
    held: Mutex<Held>,
    /// The WAL's own file object (inside its `ShimFile`), valid until the WAL is closed,
    /// which removes this buffer from the registry first.
    inner: *mut ffi::sqlite3_file,
    writes_asked: AtomicU64,
    writes_made: AtomicU64,
}

// SAFETY: `inner` is used only under `held`'s lock, and SQLite allows a file object to be used
// from any thread as long as calls do not overlap, which the lock ensures for our calls and
// SQLite's connection mutex (or its single user thread) for its own.
unsafe impl Send for WalBuffer {}
unsafe impl Sync for WalBuffer {}

#[derive(Default)]
struct Held {
    /// Offset of `bytes[0]` in the file.
    offset: i64,
    bytes: Vec<u8>,
    /// The last write was a commit frame's header: write everything once its page is here.
    commit_header: bool,
    /// A held write that failed where SQLite could not be told (see `settle_deferred`).
    failure: Option<c_int>,
}

impl WalBuffer {
    /// Writes what is held; returns SQLite's result code.
    ///
    /// # Safety
    /// `self.inner` must be an open file object of the default VFS.
    unsafe fn write_held(&self, held: &mut Held) -> c_int {
        if held.bytes.is_empty() {
            return ffi::SQLITE_OK;
        }
        let mut rc = ffi::SQLITE_OK;
        let mut offset = held.offset;
        for chunk in held.bytes.chunks(MAX_WRITE_BYTES) {
            // Both fit: a chunk is below 128 KiB, and the WAL below 2^63 bytes.
            let (Ok(amount), Ok(length)) =
                (c_int::try_from(chunk.len()), i64::try_from(chunk.len()))
            else {
                rc = ffi::SQLITE_IOERR_WRITE;
                break;
            };
            // SAFETY: the caller guarantees `inner`; the bytes outlive the call.
            rc = unsafe {
                match (*(*self.inner).pMethods).xWrite {
                    Some(write) => {
                        write(self.inner, chunk.as_ptr().cast::<c_void>(), amount, offset)
                    }
                    None => ffi::SQLITE_IOERR_WRITE,
                }
            };
            self.writes_made.fetch_add(1, Ordering::Relaxed);
            if rc != ffi::SQLITE_OK {
                break;
            }
            offset = offset.saturating_add(length);
        }
        held.bytes.clear();
        held.commit_header = false;
        HOLDING.fetch_sub(1, Ordering::AcqRel);
        rc
    }

    /// Writes what is held before another call on the file; a failure held from before fails
    /// the call.
    ///
    /// # Safety
    /// As [`WalBuffer::write_held`].
    unsafe fn settle(&self) -> c_int {
        let mut held = lock(&self.held);
        if let Some(failure) = held.failure {
            return failure;
        }
        // SAFETY: as the caller's.
        unsafe { self.write_held(&mut held) }
    }

    /// Writes what is held from outside a call on the WAL, where a failure cannot be returned.
    ///
    /// # Safety
    /// As [`WalBuffer::write_held`].
    unsafe fn settle_deferred(&self) {
        let mut held = lock(&self.held);
        // SAFETY: as the caller's.
        let rc = unsafe { self.write_held(&mut held) };
        if rc != ffi::SQLITE_OK {
            // SQLite believes these bytes written (and may publish them): from now on the
            // WAL fails every call, and the store learns of it (`deferred_write_failure`).
            held.failure = Some(rc);
            ANY_DEFERRED_FAILURE.store(true, Ordering::Release);
        }
    }
}

/// # Safety
/// `file` must be a file object this VFS opened.
unsafe fn parts(file: *mut ffi::sqlite3_file) -> (*mut ffi::sqlite3_file, *const Role) {
    let shim = file.cast::<ShimFile>();
    // SAFETY: the caller guarantees that `file` is a `ShimFile`.
    unsafe { (ptr::addr_of_mut!((*shim).inner), (*shim).role.cast_const()) }
}

/// # Safety
/// `file` must be a file object this VFS opened.
unsafe fn inner_methods(
    file: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    // SAFETY: the default VFS's methods are static objects; `xOpen` succeeded with them.
    unsafe {
        let (inner, _) = parts(file);
        (inner, &*(*inner).pMethods)
    }
}

/// For a WAL file, writes what it holds first; returns the failure that should fail the call.
///
/// # Safety
/// `file` must be a file object this VFS opened.
unsafe fn settle_if_wal(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: as the caller's.
    unsafe {
        let (_, role) = parts(file);
        match &*role {
            Role::Wal { buffer, .. } => buffer.settle(),
            _ => ffi::SQLITE_OK,
        }
    }
}

/// Writes what the WAL of the database `file` holds (see the module's documentation).
///
/// # Safety
/// `file` must be a file object this VFS opened.
unsafe fn settle_database_wal(file: *mut ffi::sqlite3_file) {
    if HOLDING.load(Ordering::Acquire) == 0 {
        return;
    }
    // SAFETY: as the caller's.
    let role = unsafe { &*parts(file).1 };
    let Role::Database { wal_name } = role else {
        return;
    };
    let Some(buffer) = HELD_BY_THIS_THREAD.take() else {
        return;
    };
    if buffer.name == *wal_name {
        // SAFETY: a WAL writes what it holds before it closes, so a buffer holding bytes
        // belongs to an open WAL; an empty one is not touched.
        unsafe { buffer.settle_deferred() };
    } else {
        HELD_BY_THIS_THREAD.set(Some(buffer));
    }
}

unsafe extern "C" fn shim_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let Some(default) = DEFAULT_VFS.get() else {
        return ffi::SQLITE_ERROR;
    };
    let default = default.0;
    let shim = file.cast::<ShimFile>();
    // SAFETY: SQLite hands us `szOsFile` zeroed bytes for `file`, room for a `ShimFile` whose
    // `inner` is as large as the default VFS needs; `name` is null or a C string.
    unsafe {
        (*shim).base.pMethods = ptr::null();
        let inner = ptr::addr_of_mut!((*shim).inner);
        let Some(open) = (*default).xOpen else {
            return ffi::SQLITE_ERROR;
        };
        let rc = open(default, name, inner, flags, out_flags);
        if (*inner).pMethods.is_null() {
            return rc;
        }
        let name_bytes = if name.is_null() {
            None
        } else {
            Some(CStr::from_ptr(name).to_bytes().to_vec())
        };
        let role = match name_bytes {
            Some(name) if flags & ffi::SQLITE_OPEN_WAL != 0 => {
                let buffer = Arc::new(WalBuffer {
                    name: name.clone(),
                    held: Mutex::new(Held::default()),
                    inner,
                    writes_asked: AtomicU64::new(0),
                    writes_made: AtomicU64::new(0),
                });
                lock(&REGISTRY)
                    .entry(name.clone())
                    .or_default()
                    .push(Arc::clone(&buffer));
                Role::Wal { name, buffer }
            }
            Some(mut name) if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 => {
                name.extend_from_slice(b"-wal");
                Role::Database { wal_name: name }
            }
            _ => Role::Other,
        };
        (*shim).role = Box::into_raw(Box::new(role));
        (*shim).base.pMethods = &METHODS;
        rc
    }
}

unsafe extern "C" fn shim_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls this once, on a file this VFS opened; nothing uses it afterwards.
    unsafe {
        let settled = settle_if_wal(file);
        let shim = file.cast::<ShimFile>();
        let role = Box::from_raw((*shim).role);
        (*shim).role = ptr::null_mut();
        if let Role::Wal { name, buffer } = &*role {
            let mut registry = lock(&REGISTRY);
            if let Some(buffers) = registry.get_mut(name) {
                buffers.retain(|other| !Arc::ptr_eq(other, buffer));
                if buffers.is_empty() {
                    registry.remove(name);
                }
            }
        }
        let (inner, methods) = inner_methods(file);
        let closed = match methods.xClose {
            Some(close) => close(inner),
            None => ffi::SQLITE_OK,
        };
        if settled != ffi::SQLITE_OK {
            settled
        } else {
            closed
        }
    }
}

unsafe extern "C" fn shim_read(
    file: *mut ffi::sqlite3_file,
    out: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let settled = settle_if_wal(file);
        if settled != ffi::SQLITE_OK {
            return ffi::SQLITE_IOERR_READ;
        }
        let (inner, methods) = inner_methods(file);
        match methods.xRead {
            Some(read) => read(inner, out, amount, offset),
            None => ffi::SQLITE_IOERR_READ,
        }
    }
}

unsafe extern "C" fn shim_write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite's arguments: `data` holds `amount` bytes.
    unsafe {
        let (inner, role) = parts(file);
        let Role::Wal { buffer, .. } = &*role else {
            let methods = &*(*inner).pMethods;
            return match methods.xWrite {
                Some(write) => write(inner, data, amount, offset),
                None => ffi::SQLITE_IOERR_WRITE,
            };
        };
        let Ok(length) = usize::try_from(amount) else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        if length == 0 {
            return ffi::SQLITE_OK;
        }
        let bytes = std::slice::from_raw_parts(data.cast::<u8>(), length);
        buffer.writes_asked.fetch_add(1, Ordering::Relaxed);
        let mut held = lock(&buffer.held);
        if let Some(failure) = held.failure {
            return failure;
        }
        let continues = i64::try_from(held.bytes.len())
            .ok()
            .and_then(|held_length| held.offset.checked_add(held_length))
            == Some(offset);
        if !held.bytes.is_empty() && !continues {
            let rc = buffer.write_held(&mut held);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        if held.bytes.is_empty() {
            held.offset = offset;
            HOLDING.fetch_add(1, Ordering::AcqRel);
            HELD_BY_THIS_THREAD.set(Some(Arc::clone(buffer)));
        }
        held.bytes.extend_from_slice(bytes);
        let completes_commit = held.commit_header;
        held.commit_header = amount == FRAME_HEADER_BYTES && bytes.get(4..8) != Some(&[0; 4]);
        if completes_commit || held.bytes.len() >= MAX_HELD_BYTES {
            return buffer.write_held(&mut held);
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn shim_truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let settled = settle_if_wal(file);
        if settled != ffi::SQLITE_OK {
            return settled;
        }
        let (inner, methods) = inner_methods(file);
        match methods.xTruncate {
            Some(truncate) => truncate(inner, size),
            None => ffi::SQLITE_IOERR_TRUNCATE,
        }
    }
}

unsafe extern "C" fn shim_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let settled = settle_if_wal(file);
        if settled != ffi::SQLITE_OK {
            return ffi::SQLITE_IOERR_FSYNC;
        }
        let (inner, methods) = inner_methods(file);
        match methods.xSync {
            Some(sync) => sync(inner, flags),
            None => ffi::SQLITE_IOERR_FSYNC,
        }
    }
}

unsafe extern "C" fn shim_file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let settled = settle_if_wal(file);
        if settled != ffi::SQLITE_OK {
            return ffi::SQLITE_IOERR_FSTAT;
        }
        let (inner, methods) = inner_methods(file);
        match methods.xFileSize {
            Some(file_size) => file_size(inner, size),
            None => ffi::SQLITE_IOERR_FSTAT,
        }
    }
}

unsafe extern "C" fn shim_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xLock {
            Some(lock) => lock(inner, level),
            None => ffi::SQLITE_IOERR_LOCK,
        }
    }
}

unsafe extern "C" fn shim_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xUnlock {
            Some(unlock) => unlock(inner, level),
            None => ffi::SQLITE_IOERR_UNLOCK,
        }
    }
}

unsafe extern "C" fn shim_check_reserved_lock(
    file: *mut ffi::sqlite3_file,
    out: *mut c_int,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xCheckReservedLock {
            Some(check) => check(inner, out),
            None => ffi::SQLITE_IOERR_CHECKRESERVEDLOCK,
        }
    }
}

unsafe extern "C" fn shim_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    argument: *mut c_void,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let settled = settle_if_wal(file);
        if settled != ffi::SQLITE_OK {
            return settled;
        }
        let (inner, methods) = inner_methods(file);
        match methods.xFileControl {
            Some(control) => control(inner, op, argument),
            None => ffi::SQLITE_NOTFOUND,
        }
    }
}

unsafe extern "C" fn shim_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xSectorSize {
            Some(sector_size) => sector_size(inner),
            None => 4096,
        }
    }
}

unsafe extern "C" fn shim_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xDeviceCharacteristics {
            Some(characteristics) => characteristics(inner),
            None => 0,
        }
    }
}

unsafe extern "C" fn shim_shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    region_size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xShmMap {
            Some(map) => map(inner, region, region_size, extend, out),
            None => ffi::SQLITE_IOERR_SHMMAP,
        }
    }
}

unsafe extern "C" fn shim_shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    count: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        settle_database_wal(file);
        let (inner, methods) = inner_methods(file);
        match methods.xShmLock {
            Some(shm_lock) => shm_lock(inner, offset, count, flags),
            None => ffi::SQLITE_IOERR_SHMLOCK,
        }
    }
}

unsafe extern "C" fn shim_shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        settle_database_wal(file);
        let (inner, methods) = inner_methods(file);
        if let Some(barrier) = methods.xShmBarrier {
            barrier(inner);
        }
    }
}

unsafe extern "C" fn shim_shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xShmUnmap {
            Some(unmap) => unmap(inner, delete),
            None => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn shim_fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on; without the method there is no mapping to offer.
    unsafe {
        let settled = settle_if_wal(file);
        if settled != ffi::SQLITE_OK {
            return settled;
        }
        let (inner, methods) = inner_methods(file);
        match methods.xFetch {
            Some(fetch) if methods.iVersion >= 3 => fetch(inner, offset, amount, out),
            _ => {
                *out = ptr::null_mut();
                ffi::SQLITE_OK
            }
        }
    }
}

unsafe extern "C" fn shim_unfetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    page: *mut c_void,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xUnfetch {
            Some(unfetch) if methods.iVersion >= 3 => unfetch(inner, offset, page),
            _ => ffi::SQLITE_OK,
        }
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(shim_close),
    xRead: Some(shim_read),
    xWrite: Some(shim_write),
    xTruncate: Some(shim_truncate),
    xSync: Some(shim_sync),
    xFileSize: Some(shim_file_size),
    xLock: Some(shim_lock),
    xUnlock: Some(shim_unlock),
    xCheckReservedLock: Some(shim_check_reserved_lock),
    xFileControl: Some(shim_file_control),
    xSectorSize: Some(shim_sector_size),
    xDeviceCharacteristics: Some(shim_device_characteristics),
    xShmMap: Some(shim_shm_map),
    xShmLock: Some(shim_shm_lock),
    xShmBarrier: Some(shim_shm_barrier),
    xShmUnmap: Some(shim_shm_unmap),
    xFetch: Some(shim_fetch),
    xUnfetch: Some(shim_unfetch),
};

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::{Connection, OpenFlags, params};

    use super::*;

    fn open_through_shim(path: &Path) -> Connection {
        let vfs = register().expect("register the VFS");
        let connection = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), vfs)
            .expect("open through the VFS");
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA wal_autocheckpoint = 0;
                 CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, value INTEGER, data BLOB);",
            )
            .expect("set up");
        connection
    }

    fn wal_name(connection: &Connection) -> Vec<u8> {
        let database = connection.path().expect("database name");
        format!("{database}-wal").into_bytes()
    }

    /// (rows, sum of values, sum of data lengths), the content every check compares.
    fn content(connection: &Connection) -> (i64, i64, i64) {
        connection
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(value), 0), COALESCE(SUM(length(data)), 0) FROM rows",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .expect("content")
    }

    fn insert(connection: &Connection, from: i64, count: i64, value: i64) {
        let mut statement = connection
            .prepare_cached("INSERT INTO rows (id, value, data) VALUES (?1, ?2, randomblob(1000))")
            .expect("prepare");
        for id in from..from + count {
            statement.execute(params![id, value]).expect("insert");
        }
    }

    #[test]
    fn a_transactions_frames_reach_the_wal_in_a_few_writes() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("gather.sqlite3");
        let connection = open_through_shim(&path);
        let wal = wal_name(&connection);
        let (asked_before, made_before) = write_counts(&wal).expect("the WAL is registered");

        connection.execute_batch("BEGIN").expect("begin");
        insert(&connection, 1, 200, 1);
        connection.execute_batch("COMMIT").expect("commit");

        let (asked, made) = write_counts(&wal).expect("the WAL is registered");
        let (asked, made) = (asked - asked_before, made - made_before);
        // 200 rows of 1 KB fill about 60 pages: two write calls each from SQLite.
        assert!(asked >= 100, "SQLite asked for {asked} writes");
        assert!(
            made <= 2,
            "{made} writes reached the file for {asked} asked"
        );

        // Another connection, through the default VFS, reads the commit at once.
        let reader = Connection::open(&path).expect("reader");
        assert_eq!(content(&reader), (200, 200, 200_000));
    }

    /// A copy of the database and its WAL taken while the writer is open, as a crash leaves
    /// them, recovers exactly the committed transactions: every frame reached the file, at
    /// its place, with its checksum. The writer's cache is tiny, so transactions spill frames
    /// before their commit, rewrite spilled pages in place, and rewrite frame checksums.
    #[test]
    fn what_a_crash_leaves_holds_every_commit() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("crash.sqlite3");
        let connection = open_through_shim(&path);
        connection
            .execute_batch("PRAGMA cache_size = 8;")
            .expect("small cache");

        connection.execute_batch("BEGIN").expect("begin");
        insert(&connection, 1, 300, 1);
        connection
            .execute("UPDATE rows SET value = 2 WHERE id % 2 = 0", [])
            .expect("update");
        connection.execute_batch("COMMIT").expect("commit");
        // Spills and then rolls back: none of it may survive.
        connection.execute_batch("BEGIN").expect("begin");
        insert(&connection, 10_000, 300, 7);
        connection.execute_batch("ROLLBACK").expect("rollback");
        // The copy is taken right after the last of these commits.
        for round in 0..20 {
            connection.execute_batch("BEGIN").expect("begin");
            insert(&connection, 1_000 + round * 5, 5, 3);
            connection.execute_batch("COMMIT").expect("commit");
        }
        let copy = dir.path().join("copy");
        std::fs::create_dir(&copy).expect("copy directory");
        std::fs::copy(&path, copy.join("crash.sqlite3")).expect("copy the database");
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        std::fs::copy(&wal, copy.join("crash.sqlite3-wal")).expect("copy the WAL");
        // Only now: reading pages back through the writer writes what the shim holds.
        let committed = content(&connection);
        assert_eq!(committed, (400, 150 + 300 + 300, 400_000));

        let recovered = Connection::open(copy.join("crash.sqlite3")).expect("open the copy");
        let check: String = recovered
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .expect("integrity check");
        assert_eq!(check, "ok");
        assert_eq!(content(&recovered), committed);
        drop(connection);
    }

    #[test]
    fn a_wal_is_forgotten_when_it_closes() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("close.sqlite3");
        let connection = open_through_shim(&path);
        let wal = wal_name(&connection);
        assert!(write_counts(&wal).is_some());
        drop(connection);
        assert!(write_counts(&wal).is_none());
        assert_eq!(deferred_write_failure(&wal), None);
    }
}
