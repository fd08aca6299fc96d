//! The parts of librados and librbd vubd calls, loaded at run time with `dlopen`.
//!
//! vubd does not link against Ceph: the libraries (Debian's `librbd1`, which pulls in
//! `librados2`) are needed only by daemons that serve RBD images, as QEMU keeps its RBD driver
//! in a module. The signatures below are those of `<rados/librados.h>` and `<rbd/librbd.h>` of
//! librbd API 1.16 (Ceph 16), every one of which older and newer releases keep unchanged.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

pub type RadosT = *mut c_void;
pub type IoctxT = *mut c_void;
pub type ImageT = *mut c_void;
pub type CompletionT = *mut c_void;
pub type Callback = unsafe extern "C" fn(c: CompletionT, arg: *mut c_void);

/// `RBD_LOCK_MODE_EXCLUSIVE` of `rbd_lock_mode_t`.
pub const LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK` (`<rbd/features.h>`).
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_FEATURE_FAST_DIFF`: the object map can say which objects exist, without a look at
/// each.
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FLAG_FAST_DIFF_INVALID` (`rbd_get_flags`): the fast-diff map must be rebuilt first.
pub const FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;
/// `rbd_diff_iterate2`'s callback: an extent (offset, length, whether it holds data).
pub type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;
/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zeroes that stay allocated.
pub const WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

/// Function pointers into the loaded libraries.
pub struct Lib {
    pub rados_create2:
        unsafe extern "C" fn(*mut RadosT, *const c_char, *const c_char, u64) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(RadosT),
    pub rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut IoctxT) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(IoctxT),
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(IoctxT, *const c_char),
    pub rbd_open: unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(ImageT) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    pub rbd_get_features: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    pub rbd_resize: unsafe extern "C" fn(ImageT, u64) -> c_int,
    pub rbd_lock_acquire: unsafe extern "C" fn(ImageT, c_int) -> c_int,
    pub rbd_get_flags: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    pub rbd_diff_iterate2: unsafe extern "C" fn(
        ImageT,
        *const c_char,
        u64,
        u64,
        u8,
        u8,
        DiffCallback,
        *mut c_void,
    ) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Callback, *mut CompletionT) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(CompletionT) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(CompletionT),
    pub rbd_aio_readv:
        unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int,
    pub rbd_aio_writev:
        unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(ImageT, CompletionT) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(ImageT, u64, u64, CompletionT) -> c_int,
    pub rbd_aio_write_zeroes:
        unsafe extern "C" fn(ImageT, u64, usize, CompletionT, c_int, c_int) -> c_int,
}

/// The libraries, loaded on first use; the error says what to install.
pub fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// `dlopen` a library for good (never closed: librbd's threads outlive any one image).
fn open(name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: a NUL-terminated name; dlopen runs the library's initialisers, which is what
    // loading it means.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!(
            "cannot load {} ({}); install Ceph's client library: apt install librbd1",
            name.to_string_lossy(),
            dl_error()
        ));
    }
    Ok(handle)
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl call
    // on this thread, copied at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "unknown error".into();
    }
    // SAFETY: as above.
    unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
}

/// `ptr` as the function pointer type `F`.
///
/// # Safety
/// `ptr` must be a function of exactly the signature `F` declares.
unsafe fn fn_ptr<F: Copy>(ptr: *mut c_void) -> F {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>()) };
    // SAFETY: same size (checked at compile time); the signature is the caller's promise.
    unsafe { std::mem::transmute_copy(&ptr) }
}

fn load() -> Result<Lib, String> {
    let rados = open(c"librados.so.2")?;
    let rbd = open(c"librbd.so.1")?;
    /// Look up `$name` in `$handle` as the field's function pointer type.
    macro_rules! sym {
        ($handle:expr, $name:ident) => {{
            let name = concat!(stringify!($name), "\0");
            // SAFETY: a NUL-terminated symbol name in a library loaded above.
            let ptr = unsafe { libc::dlsym($handle, name.as_ptr().cast()) };
            if ptr.is_null() {
                return Err(format!(
                    "the Ceph client library lacks {} ({}); it is older than librbd API \
                     1.16 (Ceph 16)",
                    stringify!($name),
                    dl_error()
                ));
            }
            // SAFETY: the symbol has the C signature declared for this field (librados.h,
            // librbd.h).
            unsafe { fn_ptr(ptr) }
        }};
    }
    Ok(Lib {
        rados_create2: sym!(rados, rados_create2),
        rados_conf_read_file: sym!(rados, rados_conf_read_file),
        rados_conf_set: sym!(rados, rados_conf_set),
        rados_connect: sym!(rados, rados_connect),
        rados_shutdown: sym!(rados, rados_shutdown),
        rados_ioctx_create: sym!(rados, rados_ioctx_create),
        rados_ioctx_destroy: sym!(rados, rados_ioctx_destroy),
        rados_ioctx_set_namespace: sym!(rados, rados_ioctx_set_namespace),
        rbd_open: sym!(rbd, rbd_open),
        rbd_open_read_only: sym!(rbd, rbd_open_read_only),
        rbd_close: sym!(rbd, rbd_close),
        rbd_get_size: sym!(rbd, rbd_get_size),
        rbd_get_features: sym!(rbd, rbd_get_features),
        rbd_resize: sym!(rbd, rbd_resize),
        rbd_lock_acquire: sym!(rbd, rbd_lock_acquire),
        rbd_get_flags: sym!(rbd, rbd_get_flags),
        rbd_diff_iterate2: sym!(rbd, rbd_diff_iterate2),
        rbd_aio_create_completion: sym!(rbd, rbd_aio_create_completion),
        rbd_aio_get_return_value: sym!(rbd, rbd_aio_get_return_value),
        rbd_aio_release: sym!(rbd, rbd_aio_release),
        rbd_aio_readv: sym!(rbd, rbd_aio_readv),
        rbd_aio_writev: sym!(rbd, rbd_aio_writev),
        rbd_aio_flush: sym!(rbd, rbd_aio_flush),
        rbd_aio_discard: sym!(rbd, rbd_aio_discard),
        rbd_aio_write_zeroes: sym!(rbd, rbd_aio_write_zeroes),
    })
}
