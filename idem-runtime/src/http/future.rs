//! [`ResponseFuture`]: what [`IdempotencyService`](super::IdempotencyService) returns.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use super::Body;

pin_project! {
    /// The response future of [`IdempotencyService`](super::IdempotencyService).
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

type Handled<B, E> = Result<Response<Body<B>>, E>;

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        // A request the layer does not apply to: the inner future as it is.
        Passthrough { #[pin] future: F },
        // The layer's own answer, known at once (missing or malformed key).
        Ready { response: Option<Response<Body<B>>> },
        // A protected request, handled in place; if the client goes away
        // mid-request, the rest runs in its own task (see `Detached`).
        Protected { work: Detached<Handled<B, E>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn ready(response: Response<Body<B>>) -> Self {
        ResponseFuture {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn protected(work: BoxFuture<Handled<B, E>>) -> Self
    where
        B: Send + 'static,
        E: Send + 'static,
    {
        ResponseFuture {
            kind: Kind::Protected {
                work: Detached {
                    work: Some(work),
                    polling: false,
                    detach: detach::<Handled<B, E>>,
                },
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Handled<B, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(Body::passthrough)))
            }
            KindProj::Ready { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => panic!("ResponseFuture polled after completion"),
            },
            KindProj::Protected { work } => work.poll(cx),
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Ready { .. } => "Ready",
            Kind::Protected { .. } => "Protected",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The handling of a protected request. Polled in place (no task, no hop to
/// another thread); if it is dropped unfinished — the client disconnected and
/// the server dropped the response future — the rest is spawned onto the
/// runtime, so the handler is never cut off between its side effects and the
/// stored response (or the released key).
pub(crate) struct Detached<T> {
    work: Option<BoxFuture<T>>,
    /// Set while `work` is polled: still set in `drop` means the poll panicked,
    /// and a future that panicked must not be polled again.
    polling: bool,
    /// Spawns the unfinished work (a function, so the type needs no bounds).
    detach: fn(BoxFuture<T>),
}

impl<T> Detached<T> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        let Some(work) = self.work.as_mut() else {
            panic!("ResponseFuture polled after completion");
        };
        self.polling = true;
        let out = ready!(work.as_mut().poll(cx));
        self.polling = false;
        self.work = None;
        Poll::Ready(out)
    }
}

impl<T> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else { return };
        if self.polling && std::thread::panicking() {
            return; // dropping `work` releases its claim
        }
        (self.detach)(work);
    }
}

fn detach<T: Send + 'static>(work: BoxFuture<T>) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            tracing::debug!(
                "client went away mid-request; finishing the request in the background"
            );
            runtime.spawn(async move {
                let _ = work.await;
            });
        }
        Err(_) => tracing::warn!("request dropped outside a Tokio runtime; its claim is released"),
    }
}
