//! The built-in I/O engine of `strata bench io`, for machines without fio: Linux native AIO
//! (`io_submit`) on a file opened with O_DIRECT, keeping `depth` requests in flight, as fio's
//! libaio engine does.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// `struct iocb` of <linux/aio_abi.h> (little-endian layout).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoCb {
    data: u64,
    key: u32,
    rw_flags: i32,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;

/// One job: what to do, how much at once, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub write: bool,
    pub random: bool,
    pub block_size: usize,
    pub depth: usize,
    pub seconds: f64,
}

/// What a job did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Done {
    pub ios: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// Buffers aligned for O_DIRECT, freed on drop.
struct Buffers {
    ptr: *mut u8,
    layout: Layout,
}

impl Buffers {
    fn new(count: usize, size: usize) -> std::io::Result<Buffers> {
        let layout = Layout::from_size_align(count * size, 4096)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // SAFETY: the layout has a non-zero size (count and size are at least 1).
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(std::io::Error::other("out of memory for I/O buffers"));
        }
        // Fill with something other than zeros, so writes are not special-cased anywhere.
        // SAFETY: ptr is valid for layout.size() bytes.
        unsafe { std::ptr::write_bytes(ptr, 0x5A, layout.size()) };
        Ok(Buffers { ptr, layout })
    }

    fn at(&self, i: usize, size: usize) -> u64 {
        // SAFETY: i * size is within the allocation (i < count).
        unsafe { self.ptr.add(i * size) as u64 }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// An AIO context, destroyed on drop.
struct Context(libc::c_ulong);

impl Context {
    fn new(depth: usize) -> std::io::Result<Context> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the context id to ctx.
        let r = unsafe { libc::syscall(libc::SYS_io_setup, depth as libc::c_long, &mut ctx) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Context(ctx))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: destroys a context this value owns; waits for its requests.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.0) };
    }
}

/// Runs `job` on `file` (opened with O_DIRECT) over its first `span` bytes.
pub fn run(file: &File, span: u64, job: Job) -> std::io::Result<Done> {
    let (bs, depth) = (job.block_size, job.depth.max(1));
    let blocks = (span / bs as u64).max(1);
    let buffers = Buffers::new(depth, bs)?;
    let ctx = Context::new(depth)?;
    let mut iocbs = vec![IoCb::default(); depth];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_seq = 0u64;
    let mut offset = |rng: &mut u64| -> i64 {
        let block = if job.random {
            super::xorshift(rng) % blocks
        } else {
            let b = next_seq % blocks;
            next_seq += 1;
            b
        };
        (block * bs as u64) as i64
    };
    let fd = file.as_raw_fd() as u32;
    let prepare = |cb: &mut IoCb, i: usize, offset: i64| {
        *cb = IoCb {
            data: i as u64,
            opcode: if job.write {
                IOCB_CMD_PWRITE
            } else {
                IOCB_CMD_PREAD
            },
            fildes: fd,
            buf: buffers.at(i, bs),
            nbytes: bs as u64,
            offset,
            ..IoCb::default()
        };
    };
    let submit = |cbs: &mut [*mut IoCb]| -> std::io::Result<()> {
        let mut sent = 0;
        while sent < cbs.len() {
            // SAFETY: every pointer names a prepared iocb that lives until its completion.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    ctx.0,
                    (cbs.len() - sent) as libc::c_long,
                    cbs[sent..].as_mut_ptr(),
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            sent += r as usize;
        }
        Ok(())
    };
    for (i, cb) in iocbs.iter_mut().enumerate() {
        let off = offset(&mut rng);
        prepare(cb, i, off);
    }
    let mut pointers: Vec<*mut IoCb> = iocbs.iter_mut().map(|c| c as *mut IoCb).collect();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(job.seconds);
    submit(&mut pointers)?;
    let mut in_flight = depth;
    let mut done = Done::default();
    let mut events = vec![IoEvent::default(); depth];
    let mut again: Vec<*mut IoCb> = Vec::with_capacity(depth);
    while in_flight > 0 {
        // SAFETY: events has room for `depth` completions.
        let n = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                ctx.0,
                1 as libc::c_long,
                depth as libc::c_long,
                events.as_mut_ptr(),
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let more = Instant::now() < deadline;
        again.clear();
        for ev in &events[..n as usize] {
            if ev.res < 0 {
                return Err(std::io::Error::from_raw_os_error(-ev.res as i32));
            }
            done.ios += 1;
            done.bytes += ev.res as u64;
            in_flight -= 1;
            if more {
                let i = ev.data as usize;
                let off = offset(&mut rng);
                prepare(&mut iocbs[i], i, off);
                again.push(&mut iocbs[i] as *mut IoCb);
            }
        }
        if !again.is_empty() {
            in_flight += again.len();
            submit(&mut again)?;
        }
    }
    done.seconds = start.elapsed().as_secs_f64();
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn reads_and_writes_at_depth_on_a_direct_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        for (write, random) in [(true, false), (false, true)] {
            let job = Job {
                write,
                random,
                block_size: 4096,
                depth: 8,
                seconds: 0.05,
            };
            let done = run(&file, 1 << 20, job).unwrap();
            assert!(done.ios > 0 && done.bytes == done.ios * 4096, "{done:?}");
        }
    }
}
