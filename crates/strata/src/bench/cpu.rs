//! What a transfer costs the machine: busy CPU time from `/proc/stat` (all processes and
//! the kernel's network path, as the servers, the link and the bench share the machine),
//! and what the work no copy over TLS can skip costs per GiB on one core: sealing and
//! opening with AES-GCM, reading the source into memory and writing it out at the other
//! end, and a CRC-32 on either side. Added to plain TCP's own cost, that is the least a
//! copy can cost, so the fastest it can be on these cores.

use std::time::Instant;

use ring::aead;

/// The machine's CPU time since boot from `/proc/stat`, in clock ticks: (busy, all). Busy
/// is user, nice, system, irq, softirq and steal; not idle or iowait. None where it cannot
/// be read.
pub fn ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    ticks_of(stat.lines().next()?)
}

/// (busy, all) ticks of the aggregate `cpu` line of `/proc/stat`.
fn ticks_of(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    // already in user.
    let v: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let all: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((all - idle, all))
}

/// Clock ticks per second.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// The machine's busy CPU seconds from when it was started.
pub struct BusyClock(Option<u64>);

impl BusyClock {
    pub fn start() -> Self {
        BusyClock(ticks().map(|(busy, _)| busy))
    }

    /// Busy seconds since the start, or None where `/proc/stat` could not be read.
    pub fn spent(&self) -> Option<f64> {
        let (now, _) = ticks()?;
        Some(now.saturating_sub(self.0?) as f64 / ticks_per_second())
    }
}

/// The machine's busy seconds over `work`, with its result.
pub fn measured<T>(work: impl FnOnce() -> T) -> (T, Option<f64>) {
    let clock = BusyClock::start();
    let out = work();
    (out, clock.spent())
}

/// The cores the machine has.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The least work a copy over TLS adds to plain TCP's, per GiB on one core.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Floor {
    /// AES-256-GCM sealing and opening.
    pub aead: f64,
    /// Two memory copies: the source read out of the page cache, the copy written into it.
    pub copies: f64,
    /// Two CRC-32 passes: computed by the sender, checked by the receiver.
    pub crc: f64,
}

impl Floor {
    /// Measures each over `bytes` (at least 16 MiB).
    pub fn measure(bytes: usize) -> Floor {
        let bytes = bytes.max(16 << 20);
        Floor {
            aead: aead_seconds_per_gib(bytes),
            copies: 2.0 * memcpy_seconds_per_gib(bytes),
            crc: 2.0 * crc_seconds_per_gib(bytes),
        }
    }

    pub fn total(&self) -> f64 {
        self.aead + self.copies + self.crc
    }
}

/// Seconds per GiB from seconds over `bytes`.
pub fn per_gib(seconds: f64, bytes: u64) -> f64 {
    seconds * (1u64 << 30) as f64 / bytes.max(1) as f64
}

/// Buffers larger than the CPU's caches, so copies and checksums run from memory as a
/// volume's data does.
const SPAN: usize = 64 << 20;

/// Seconds one core takes to copy one GiB between buffers larger than its caches.
pub fn memcpy_seconds_per_gib(bytes: usize) -> f64 {
    let from = vec![0x5au8; SPAN];
    let mut to = vec![0u8; SPAN];
    // Touched first, so page faults are not counted.
    to.copy_from_slice(&from);
    let start = Instant::now();
    let mut done = 0;
    while done < bytes {
        to.copy_from_slice(std::hint::black_box(&from));
        done += SPAN;
    }
    std::hint::black_box(&to);
    per_gib(start.elapsed().as_secs_f64(), done as u64)
}

/// Seconds one core takes to compute the CRC-32 of one GiB held in memory.
pub fn crc_seconds_per_gib(bytes: usize) -> f64 {
    let data = vec![0x5au8; SPAN];
    let start = Instant::now();
    let mut done = 0;
    let mut sum = 0u32;
    while done < bytes {
        sum ^= crc32fast::hash(std::hint::black_box(&data));
        done += SPAN;
    }
    std::hint::black_box(sum);
    per_gib(start.elapsed().as_secs_f64(), done as u64)
}

/// TLS 1.3 records' largest payload.
const RECORD: usize = 16 * 1024;

/// Seconds one core takes to seal and open one GiB as TLS records with AES-256-GCM (the
/// suite the peer service negotiates), measured over `bytes`.
pub fn aead_seconds_per_gib(bytes: usize) -> f64 {
    let key_bytes = [0x42u8; 32];
    let Ok(key) = aead::UnboundKey::new(&aead::AES_256_GCM, &key_bytes) else {
        return f64::NAN;
    };
    let key = aead::LessSafeKey::new(key);
    let mut record = vec![0x5au8; RECORD];
    let records = (bytes / RECORD).max(1);
    let start = Instant::now();
    for n in 0..records {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(n as u64).to_be_bytes());
        let sealed = key.seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::empty(),
            &mut record,
        );
        let Ok(tag) = sealed else {
            return f64::NAN;
        };
        record.extend_from_slice(tag.as_ref());
        let opened = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::empty(),
                &mut record,
            )
            .map(|plain| plain.len());
        match opened {
            Ok(len) => record.truncate(len),
            Err(_) => return f64::NAN,
        }
    }
    per_gib(start.elapsed().as_secs_f64(), (records * RECORD) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_is_the_non_idle_ticks() {
        let (busy, all) = ticks_of("cpu  100 5 50 1000 20 3 2 1 0 0").unwrap();
        assert_eq!((busy, all), (161, 1181));
        assert!(ticks_of("cpu0 1 2 3").is_none());
        assert!(ticks_of("cpu 1 x 3").is_none());
        assert!(ticks_of("").is_none());
        assert!(ticks().is_some());
        assert!(BusyClock::start().spent().is_some_and(|s| s >= 0.0));
    }

    #[test]
    fn sealing_and_opening_round_trips_and_takes_time() {
        let s = aead_seconds_per_gib(4 * RECORD);
        assert!(s.is_finite() && s > 0.0, "{s}");
    }

    #[test]
    fn the_floor_adds_its_parts() {
        let f = Floor::measure(0);
        for part in [f.aead, f.copies, f.crc] {
            assert!(part.is_finite() && part > 0.0, "{f:?}");
        }
        assert!((f.total() - (f.aead + f.copies + f.crc)).abs() < 1e-12);
    }
}
