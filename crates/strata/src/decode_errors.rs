//! A request that is not valid protobuf (a string that is not UTF-8, a truncated message) is
//! the caller's error. tonic reports it as INTERNAL; this layer rewrites it to
//! INVALID_ARGUMENT, as the CSI error scheme requires for invalid fields.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http::{self, HeaderValue};

#[derive(Clone, Copy, Default)]
pub struct DecodeErrorLayer;

impl<S> tower::Layer<S> for DecodeErrorLayer {
    type Service = DecodeErrorService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DecodeErrorService { inner }
    }
}

#[derive(Clone)]
pub struct DecodeErrorService<S> {
    inner: S,
}

fn is_decode_error<B>(res: &http::Response<B>) -> bool {
    let header = |name| res.headers().get(name).and_then(|v| v.to_str().ok());
    header("grpc-status") == Some("13")
        && header("grpc-message").is_some_and(|m| {
            m.starts_with("failed%20to%20decode") || m.starts_with("failed to decode")
        })
}

impl<S, B, R> tower::Service<http::Request<B>> for DecodeErrorService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut res = fut.await?;
            if is_decode_error(&res) {
                res.headers_mut()
                    .insert("grpc-status", HeaderValue::from_static("3"));
            }
            Ok(res)
        })
    }
}
