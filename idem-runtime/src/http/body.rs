//! The body the layer hands on: bytes it buffered (a request it fingerprinted, a
//! response it stored or replayed), or the original body, after any prefix it
//! already read.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;

use super::grpc::Framing;

pin_project! {
    /// A request or response body as [`IdempotencyLayer`](super::IdempotencyLayer)
    /// passes it on: buffered bytes (and trailers), or `B` itself, possibly after
    /// a prefix the layer read while deciding whether to store it.
    pub struct Body<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Buffered { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Passthrough { #[pin] body: B },
        Partial { prefix: Option<Bytes>, rest: Pin<Box<B>> },
    }
}

impl<B> Body<B> {
    /// A body of `data`, then `trailers` if any.
    pub(crate) fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Body {
            kind: Kind::Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// `body` itself, untouched.
    pub(crate) fn passthrough(body: B) -> Self {
        Body {
            kind: Kind::Passthrough { body },
        }
    }

    /// `prefix` (bytes already read from `rest`), then the rest of `rest`.
    pub(crate) fn partial(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Body {
            kind: Kind::Partial {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }
}

impl<B> http_body::Body for Body<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Buffered { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            KindProj::Passthrough { body } => body.poll_frame(cx),
            KindProj::Partial { prefix, rest } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
                None => rest.as_mut().poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Passthrough { body } => body.is_end_stream(),
            Kind::Partial { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Passthrough { body } => body.size_hint(),
            Kind::Partial { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let hint = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower() + extra);
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper + extra);
                }
                out
            }
        }
    }
}

impl<B> std::fmt::Debug for Body<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Buffered { data, .. } => f
                .debug_struct("Body::Buffered")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Passthrough { .. } => f.debug_struct("Body::Passthrough").finish_non_exhaustive(),
            Kind::Partial { prefix, .. } => f
                .debug_struct("Body::Partial")
                .field("prefix", &prefix.as_ref().map_or(0, Bytes::len))
                .finish_non_exhaustive(),
        }
    }
}

/// What reading a body up to a limit gave.
pub(crate) enum Read<B> {
    /// The whole body, within the limit.
    Whole {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// More than the limit: what was read, and the body to read the rest from.
    TooLarge { prefix: Bytes, rest: Pin<Box<B>> },
    /// A second gRPC message began (a streamed reply): what was read, and the
    /// body to read the rest from.
    Streamed { prefix: Bytes, rest: Pin<Box<B>> },
}

/// Reads `body` until it ends or exceeds `limit` bytes; with `framing`, also
/// until a second gRPC message begins.
pub(crate) async fn read_limited<B>(
    mut body: Pin<Box<B>>,
    limit: usize,
    mut framing: Option<Framing>,
) -> Result<Read<B>, B::Error>
where
    B: http_body::Body<Data = Bytes>,
{
    use http_body_util::BodyExt as _;

    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => {
                len += data.len();
                let streamed = framing.as_mut().is_some_and(|f| f.feed(&data) > 1);
                chunks.push(data);
                if streamed {
                    return Ok(Read::Streamed {
                        prefix: concat(chunks, len),
                        rest: body,
                    });
                }
                if len > limit {
                    return Ok(Read::TooLarge {
                        prefix: concat(chunks, len),
                        rest: body,
                    });
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    match &mut trailers {
                        Some(all) => all.extend(t),
                        None => trailers = Some(t),
                    }
                }
            }
        }
    }
    Ok(Read::Whole {
        data: concat(chunks, len),
        trailers,
    })
}

/// Reads and discards up to `cap` more bytes of a request that is refused, so
/// the client, still sending, reads the refusal instead of a broken pipe (the
/// "lingering close" of HTTP/1.1 servers). Errors end the drain: the body is
/// being refused anyway.
pub(crate) async fn drain<B>(mut body: Pin<Box<B>>, cap: u64)
where
    B: http_body::Body<Data = Bytes>,
{
    use http_body_util::BodyExt as _;

    let mut read = 0u64;
    while read <= cap {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => return,
        }
    }
}

fn concat(mut chunks: Vec<Bytes>, len: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut all = Vec::with_capacity(len);
    for chunk in chunks {
        all.extend_from_slice(&chunk);
    }
    Bytes::from(all)
}
