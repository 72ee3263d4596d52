//! [`ResponseFuture`]: what [`IdempotencyService`](super::IdempotencyService) returns.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tokio::task::JoinHandle;

use super::problem::Problem;
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
        // A protected request, handled in its own task so that a client going
        // away does not cancel the handler between its side effects and the
        // stored record.
        Spawned { handle: JoinHandle<Handled<B, E>> },
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

    pub(crate) fn spawned(handle: JoinHandle<Handled<B, E>>) -> Self {
        ResponseFuture {
            kind: Kind::Spawned { handle },
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
            KindProj::Spawned { handle } => match ready!(Pin::new(handle).poll(cx)) {
                Ok(out) => Poll::Ready(out),
                // The handler panicked: panic here too, as it would have without
                // the layer (its claim was released when the task unwound).
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Err(_) => Poll::Ready(Ok(Problem::Internal
                    .response("the runtime shut down while the request was being handled"))),
            },
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Ready { .. } => "Ready",
            Kind::Spawned { .. } => "Spawned",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}
