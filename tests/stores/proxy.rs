//! A TCP proxy in front of a real server, which a test can cut (every open
//! connection dropped, new ones refused) and restore: a database that goes
//! away mid-request, without touching the database itself. It can also lose one
//! reply: forward a request carrying a marker, let the server answer, then drop
//! the connection before the answer reaches the client (a write that landed
//! whose reply was lost).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// A cuttable proxy to `upstream`.
pub struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    lose_reply: Arc<Mutex<Option<Vec<u8>>>>,
    replies_lost: Arc<std::sync::atomic::AtomicUsize>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    /// Listens on a free local port and forwards to `upstream`.
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let lose_reply: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let replies_lost: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let upstream = upstream.to_owned();
        let accept = tokio::spawn({
            let cut = cut.clone();
            let connections = connections.clone();
            let lose_reply = lose_reply.clone();
            let replies_lost = replies_lost.clone();
            async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let lose_reply = lose_reply.clone();
                    let replies_lost = replies_lost.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(upstream).await {
                            pump(&mut client, server, &lose_reply, &replies_lost).await;
                        }
                    });
                    connections.lock().unwrap().push(task.abort_handle());
                }
            }
        })
        .abort_handle();
        Proxy {
            addr,
            cut,
            lose_reply,
            replies_lost,
            connections,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// Loses the reply to the next request whose bytes contain `marker`: the
    /// request reaches the server, the server's answer is dropped and the
    /// connection closed. Once only.
    pub fn lose_reply_to(&self, marker: &[u8]) {
        *self.lose_reply.lock().unwrap() = Some(marker.to_vec());
    }

    /// How many replies were lost so far.
    pub fn replies_lost(&self) -> usize {
        self.replies_lost.load(Ordering::SeqCst)
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Forwards both ways; a client chunk holding the armed marker makes the next
/// server chunk vanish along with the connection.
async fn pump(
    client: &mut TcpStream,
    mut server: TcpStream,
    lose_reply: &Mutex<Option<Vec<u8>>>,
    replies_lost: &std::sync::atomic::AtomicUsize,
) {
    let (mut client_rx, mut client_tx) = client.split();
    let (mut server_rx, mut server_tx) = server.split();
    let armed = AtomicBool::new(false);
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            {
                let mut marker = lose_reply.lock().unwrap();
                let hit = marker
                    .as_deref()
                    .is_some_and(|m| buf[..n].windows(m.len()).any(|w| w == m));
                if hit {
                    *marker = None;
                    armed.store(true, Ordering::SeqCst);
                }
            }
            if server_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if armed.load(Ordering::SeqCst) {
                // The server answered; the client never hears it.
                replies_lost.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever side ends first ends the connection (both sockets are dropped).
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}
