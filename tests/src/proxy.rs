//! A loopback TCP proxy that injects the network faults a test needs: pass traffic through,
//! cut every connection (and refuse new ones), or hang (accept and never answer). The kernel
//! here has no netem, so faults between the worker and a server are made here.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Cut the open connections; close new ones at once.
    Reset,
    /// Accept new connections and never send a byte (a server hanging before its greeting).
    Hang,
}

struct State {
    mode: Mode,
    /// Forwarding tasks of open connections, and silent sockets held in Hang.
    open: Vec<JoinHandle<()>>,
    held: Vec<TcpStream>,
}

/// A proxy in front of 127.0.0.1:`target`, listening on its own port.
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Pass,
            open: Vec::new(),
            held: Vec::new(),
        }));
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut state = shared.lock().expect("proxy state");
                match state.mode {
                    Mode::Reset => drop(client),
                    Mode::Hang => state.held.push(client),
                    Mode::Pass => {
                        let task = tokio::spawn(async move {
                            if let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await
                            {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                        });
                        state.open.retain(|t| !t.is_finished());
                        state.open.push(task);
                    }
                }
            }
        });
        Proxy {
            port,
            state,
            accept,
        }
    }

    /// Switches mode; Reset and Hang cut what is open, Pass lets held sockets go.
    pub fn set(&self, mode: Mode) {
        let mut state = self.state.lock().expect("proxy state");
        state.mode = mode;
        if mode != Mode::Pass {
            for task in state.open.drain(..) {
                task.abort();
            }
        } else {
            state.held.clear();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.set(Mode::Reset);
    }
}
