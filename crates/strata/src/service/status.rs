//! The one place where core errors become gRPC statuses.

use strata_core::Error;
use tonic::{Code, Status};

pub fn to_status(err: Error) -> Status {
    let code = match &err {
        Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::OutOfRange(_) => Code::OutOfRange,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::Aborted(_) => Code::Aborted,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Unimplemented(_) => Code::Unimplemented,
        Error::Internal(_) => Code::Internal,
    };
    Status::new(code, err.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_error_becomes_unknown() {
        for e in [
            Error::InvalidArgument("a".into()),
            Error::NotFound("a".into()),
            Error::AlreadyExists("a".into()),
            Error::FailedPrecondition("a".into()),
            Error::OutOfRange("a".into()),
            Error::ResourceExhausted("a".into()),
            Error::Aborted("a".into()),
            Error::Unavailable("a".into()),
            Error::Unimplemented("a".into()),
            Error::Internal("a".into()),
        ] {
            let s = to_status(e);
            assert_ne!(s.code(), Code::Unknown);
            assert_eq!(s.message(), "a");
        }
    }
}
