//! CSI endpoints: `unix:///path/csi.sock` (the standard) or `tcp://127.0.0.1:PORT` (tests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            // unix:///abs/path and unix:/abs/path both name /abs/path.
            let path = PathBuf::from(rest);
            if !path.is_absolute() {
                return Err(format!(
                    "unix endpoint {s:?} needs an absolute path, as unix:///run/csi.sock"
                ));
            }
            return Ok(Endpoint::Unix(path));
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            return rest
                .parse()
                .map(Endpoint::Tcp)
                .map_err(|e| format!("tcp endpoint {s:?}: {e}; use tcp://127.0.0.1:PORT"));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        Err(format!(
            "endpoint {s:?} is neither unix:///PATH nor tcp://HOST:PORT"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_endpoint_forms() {
        assert_eq!(
            "unix:///run/csi.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/csi.sock".into())
        );
        assert_eq!(
            "unix:/run/csi.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/csi.sock".into())
        );
        assert_eq!(
            "tcp://127.0.0.1:9000".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:9000".parse().unwrap())
        );
        assert!("unix://relative".parse::<Endpoint>().is_err());
        assert!("http://x".parse::<Endpoint>().is_err());
    }
}
