//! Sizes as people write them: parsed from the command line (`64Mi`, `1G`) and shown in
//! tables (`256Mi`, `1.5Gi`). Shared by the server's flags and the client.

pub use strata_core::model::parse_size;

/// Sizes as people write them: `256Mi`, `1Gi`, `1.5Gi`, `512B`.
pub fn human_bytes(n: i64) -> String {
    const UNITS: [(i64, &str); 5] = [
        (1 << 50, "Pi"),
        (1 << 40, "Ti"),
        (1 << 30, "Gi"),
        (1 << 20, "Mi"),
        (1 << 10, "Ki"),
    ];
    for (size, suffix) in UNITS {
        if n.abs() >= size {
            return if n % size == 0 {
                format!("{}{suffix}", n / size)
            } else {
                format!("{:.1}{suffix}", n as f64 / size as f64)
            };
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64Mi").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }

    #[test]
    fn sizes_read_like_people_write() {
        assert_eq!(human_bytes(1 << 30), "1Gi");
        assert_eq!(human_bytes(16 << 20), "16Mi");
        assert_eq!(human_bytes(1536), "1.5Ki");
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(0), "0B");
    }
}
