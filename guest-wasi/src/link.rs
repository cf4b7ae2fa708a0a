//! Every WASI preview1 function as a wasmi host function over [`State`].
//!
//! Each wrapper converts the WebAssembly integers, finds the linear memory, calls the method of
//! [`Wasi`] and returns its errno. Functions for files and directories answer as
//! [`Wasi::not_a_file`] and [`Wasi::no_directory`] describe: there is no file system.

use wasmi::{Caller, Engine, Error, Extern, Linker, Memory, StoreLimits};

use crate::abi::{Errno, MODULE};
use crate::host::Host;
use crate::mem::Mem;
use crate::wasi::{Wasi, ret};

/// The store data of a running program.
pub struct State<H> {
    pub wasi: Wasi<H>,
    pub(crate) limits: StoreLimits,
    /// The exported linear memory, found at the first call that needs it.
    pub(crate) memory: Option<Memory>,
    /// Fuel consumed before the current slice, and the fuel the slice was given: the total so
    /// far is `fuel_base + fuel_given - remaining`.
    pub(crate) fuel_base: u64,
    pub(crate) fuel_given: u64,
}

type C<'a, H> = Caller<'a, State<H>>;

fn memory<H>(c: &mut C<'_, H>) -> Option<Memory> {
    if c.data().memory.is_none() {
        let m = c.get_export("memory").and_then(Extern::into_memory);
        c.data_mut().memory = m;
    }
    c.data().memory
}

/// Calls `f` with the program's memory; a module without an exported memory gets `ENOSYS` from
/// every function that needs one (the module check refuses such modules before they run).
fn with<H: Host>(c: &mut C<'_, H>, f: impl FnOnce(&mut Wasi<H>, &mut Mem) -> Result<(), Errno>) -> i32 {
    let Some(mem) = memory(c) else { return Errno::NOSYS.0 as i32 };
    let (bytes, state) = mem.data_and_store_mut(c);
    ret(f(&mut state.wasi, &mut Mem(bytes)))
}

/// Calls `f`, which needs no memory.
fn plain<H: Host>(c: &mut C<'_, H>, f: impl FnOnce(&mut Wasi<H>) -> Result<(), Errno>) -> i32 {
    ret(f(&mut c.data_mut().wasi))
}

fn fuel_used<H>(c: &C<'_, H>) -> u64 {
    let s = c.data();
    let left = c.get_fuel().unwrap_or(0);
    s.fuel_base + s.fuel_given.saturating_sub(left)
}

/// A linker that defines all of WASI preview1 for programs whose store data is `State<H>`.
pub fn linker<H: Host + 'static>(engine: &Engine) -> Result<Linker<State<H>>, wasmi::errors::LinkerError> {
    let mut l = Linker::<State<H>>::new(engine);
    let u = |v: i32| v as u32;

    l.func_wrap(MODULE, "args_get", move |mut c: C<H>, a: i32, b: i32| with(&mut c, |w, m| w.args_get(m, u(a), u(b))))?;
    l.func_wrap(MODULE, "args_sizes_get", move |mut c: C<H>, a: i32, b: i32| {
        with(&mut c, |w, m| w.args_sizes_get(m, u(a), u(b)))
    })?;
    l.func_wrap(MODULE, "environ_get", move |mut c: C<H>, a: i32, b: i32| {
        with(&mut c, |w, m| w.environ_get(m, u(a), u(b)))
    })?;
    l.func_wrap(MODULE, "environ_sizes_get", move |mut c: C<H>, a: i32, b: i32| {
        with(&mut c, |w, m| w.environ_sizes_get(m, u(a), u(b)))
    })?;
    l.func_wrap(MODULE, "clock_res_get", move |mut c: C<H>, id: i32, out: i32| {
        with(&mut c, |w, m| w.clock_res_get(m, u(id), u(out)))
    })?;
    l.func_wrap(MODULE, "clock_time_get", move |mut c: C<H>, id: i32, precision: i64, out: i32| {
        with(&mut c, |w, m| w.clock_time_get(m, u(id), precision as u64, u(out)))
    })?;
    l.func_wrap(MODULE, "random_get", move |mut c: C<H>, buf: i32, len: i32| {
        with(&mut c, |w, m| w.random_get(m, u(buf), u(len)))
    })?;
    l.func_wrap(MODULE, "proc_exit", move |mut c: C<H>, status: i32| -> Result<(), Error> {
        c.data_mut().wasi.exit_status = Some(u(status));
        Err(Error::i32_exit(status))
    })?;
    l.func_wrap(MODULE, "proc_raise", move |mut c: C<H>, _sig: i32| plain(&mut c, |_| Err(Errno::NOSYS)))?;
    l.func_wrap(MODULE, "sched_yield", move |mut c: C<H>| {
        let fuel = fuel_used(&c);
        plain(&mut c, |w| w.sched_yield(fuel))
    })?;
    l.func_wrap(MODULE, "poll_oneoff", move |mut c: C<H>, input: i32, output: i32, n: i32, out_n: i32| {
        with(&mut c, |w, m| w.poll_oneoff(m, u(input), u(output), u(n), u(out_n)))
    })?;

    l.func_wrap(MODULE, "fd_close", move |mut c: C<H>, fd: i32| plain(&mut c, |w| w.fd_close(u(fd))))?;
    l.func_wrap(MODULE, "fd_fdstat_get", move |mut c: C<H>, fd: i32, out: i32| {
        with(&mut c, |w, m| w.fd_fdstat_get(m, u(fd), u(out)))
    })?;
    l.func_wrap(MODULE, "fd_fdstat_set_flags", move |mut c: C<H>, fd: i32, flags: i32| {
        plain(&mut c, |w| w.fd_fdstat_set_flags(u(fd), flags as u16))
    })?;
    l.func_wrap(MODULE, "fd_fdstat_set_rights", move |mut c: C<H>, fd: i32, _base: i64, _inheriting: i64| {
        plain(&mut c, |w| w.fd_fdstat_set_rights(u(fd)))
    })?;
    l.func_wrap(MODULE, "fd_filestat_get", move |mut c: C<H>, fd: i32, out: i32| {
        with(&mut c, |w, m| w.fd_filestat_get(m, u(fd), u(out)))
    })?;
    l.func_wrap(MODULE, "fd_prestat_get", move |mut c: C<H>, fd: i32, _out: i32| {
        plain(&mut c, |w| w.fd_prestat_get(u(fd)))
    })?;
    l.func_wrap(MODULE, "fd_prestat_dir_name", move |mut c: C<H>, fd: i32, _path: i32, _len: i32| {
        plain(&mut c, |w| w.fd_prestat_get(u(fd)))
    })?;
    l.func_wrap(MODULE, "fd_read", move |mut c: C<H>, fd: i32, iovs: i32, n: i32, out: i32| {
        with(&mut c, |w, m| w.fd_read(m, u(fd), u(iovs), u(n), u(out)))
    })?;
    l.func_wrap(MODULE, "fd_write", move |mut c: C<H>, fd: i32, iovs: i32, n: i32, out: i32| {
        with(&mut c, |w, m| w.fd_write(m, u(fd), u(iovs), u(n), u(out)))
    })?;
    l.func_wrap(MODULE, "fd_renumber", move |mut c: C<H>, from: i32, to: i32| {
        plain(&mut c, |w| w.fd_renumber(u(from), u(to)))
    })?;

    // Calls that need a regular file. The errors are what Linux gives for a socket or terminal.
    l.func_wrap(MODULE, "fd_seek", move |mut c: C<H>, fd: i32, _off: i64, _whence: i32, _out: i32| {
        plain(&mut c, |w| w.not_a_file(u(fd), Errno::SPIPE))
    })?;
    l.func_wrap(MODULE, "fd_tell", move |mut c: C<H>, fd: i32, _out: i32| {
        plain(&mut c, |w| w.not_a_file(u(fd), Errno::SPIPE))
    })?;
    l.func_wrap(MODULE, "fd_pread", move |mut c: C<H>, fd: i32, _iovs: i32, _n: i32, _off: i64, _out: i32| {
        plain(&mut c, |w| w.not_a_file(u(fd), Errno::SPIPE))
    })?;
    l.func_wrap(MODULE, "fd_pwrite", move |mut c: C<H>, fd: i32, _iovs: i32, _n: i32, _off: i64, _out: i32| {
        plain(&mut c, |w| w.not_a_file(u(fd), Errno::SPIPE))
    })?;
    l.func_wrap(MODULE, "fd_advise", move |mut c: C<H>, fd: i32, _off: i64, _len: i64, _advice: i32| {
        plain(&mut c, |w| w.not_a_file(u(fd), Errno::SPIPE))
    })?;
    l.func_wrap(MODULE, "fd_allocate", move |mut c: C<H>, fd: i32, _off: i64, _len: i64| {
        plain(&mut c, |w| w.not_a_file(u(fd), Errno::SPIPE))
    })?;
    l.func_wrap(MODULE, "fd_datasync", move |mut c: C<H>, fd: i32| {
        plain(&mut c, |w| w.not_a_file(u(fd), Errno::INVAL))
    })?;
    l.func_wrap(MODULE, "fd_sync", move |mut c: C<H>, fd: i32| plain(&mut c, |w| w.not_a_file(u(fd), Errno::INVAL)))?;
    l.func_wrap(MODULE, "fd_filestat_set_size", move |mut c: C<H>, fd: i32, _size: i64| {
        plain(&mut c, |w| w.not_a_file(u(fd), Errno::INVAL))
    })?;
    l.func_wrap(MODULE, "fd_filestat_set_times", move |mut c: C<H>, fd: i32, _a: i64, _m: i64, _flags: i32| {
        plain(&mut c, |w| w.not_a_file(u(fd), Errno::INVAL))
    })?;
    l.func_wrap(MODULE, "fd_readdir", move |mut c: C<H>, fd: i32, _buf: i32, _len: i32, _cookie: i64, _out: i32| {
        plain(&mut c, |w| w.not_a_file(u(fd), Errno::NOTDIR))
    })?;

    // Paths: resolved against a directory descriptor, and there are none.
    l.func_wrap(MODULE, "path_create_directory", move |mut c: C<H>, fd: i32, _p: i32, _l: i32| {
        plain(&mut c, |w| w.no_directory(u(fd)))
    })?;
    l.func_wrap(MODULE, "path_filestat_get", move |mut c: C<H>, fd: i32, _f: i32, _p: i32, _l: i32, _out: i32| {
        plain(&mut c, |w| w.no_directory(u(fd)))
    })?;
    l.func_wrap(
        MODULE,
        "path_filestat_set_times",
        move |mut c: C<H>, fd: i32, _f: i32, _p: i32, _l: i32, _a: i64, _m: i64, _fl: i32| {
            plain(&mut c, |w| w.no_directory(u(fd)))
        },
    )?;
    l.func_wrap(
        MODULE,
        "path_link",
        move |mut c: C<H>, fd: i32, _f: i32, _p: i32, _l: i32, _nfd: i32, _np: i32, _nl: i32| {
            plain(&mut c, |w| w.no_directory(u(fd)))
        },
    )?;
    l.func_wrap(
        MODULE,
        "path_open",
        move |mut c: C<H>, fd: i32, _df: i32, _p: i32, _l: i32, _of: i32, _rb: i64, _ri: i64, _ff: i32, _out: i32| {
            plain(&mut c, |w| w.no_directory(u(fd)))
        },
    )?;
    l.func_wrap(
        MODULE,
        "path_readlink",
        move |mut c: C<H>, fd: i32, _p: i32, _l: i32, _b: i32, _bl: i32, _out: i32| {
            plain(&mut c, |w| w.no_directory(u(fd)))
        },
    )?;
    l.func_wrap(MODULE, "path_remove_directory", move |mut c: C<H>, fd: i32, _p: i32, _l: i32| {
        plain(&mut c, |w| w.no_directory(u(fd)))
    })?;
    l.func_wrap(
        MODULE,
        "path_rename",
        move |mut c: C<H>, fd: i32, _p: i32, _l: i32, _nfd: i32, _np: i32, _nl: i32| {
            plain(&mut c, |w| w.no_directory(u(fd)))
        },
    )?;
    l.func_wrap(MODULE, "path_symlink", move |mut c: C<H>, _p: i32, _l: i32, fd: i32, _np: i32, _nl: i32| {
        plain(&mut c, |w| w.no_directory(u(fd)))
    })?;
    l.func_wrap(MODULE, "path_unlink_file", move |mut c: C<H>, fd: i32, _p: i32, _l: i32| {
        plain(&mut c, |w| w.no_directory(u(fd)))
    })?;

    l.func_wrap(MODULE, "sock_accept", move |mut c: C<H>, fd: i32, flags: i32, out: i32| {
        with(&mut c, |w, m| w.sock_accept(m, u(fd), flags as u16, u(out)))
    })?;
    l.func_wrap(
        MODULE,
        "sock_recv",
        move |mut c: C<H>, fd: i32, iovs: i32, n: i32, flags: i32, out_len: i32, out_flags: i32| {
            with(&mut c, |w, m| w.sock_recv(m, u(fd), u(iovs), u(n), flags as u16, u(out_len), u(out_flags)))
        },
    )?;
    l.func_wrap(MODULE, "sock_send", move |mut c: C<H>, fd: i32, iovs: i32, n: i32, flags: i32, out_len: i32| {
        with(&mut c, |w, m| w.sock_send(m, u(fd), u(iovs), u(n), flags as u16, u(out_len)))
    })?;
    l.func_wrap(MODULE, "sock_shutdown", move |mut c: C<H>, fd: i32, how: i32| {
        plain(&mut c, |w| w.sock_shutdown(u(fd), u(how)))
    })?;
    Ok(l)
}
