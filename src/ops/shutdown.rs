//! Graceful shutdown, as in tokio's mini-redis: one signal that every task listens to.
//!
//! The daemon flips a `watch` channel on SIGTERM/SIGINT; listeners stop accepting, connections
//! stop between messages, the writer flushes, the forwarder disconnects cleanly.

use tokio::sync::watch;

/// A cloneable listener for the shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending side, held by the daemon's main task.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

/// A new trigger and its first listener.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.tx.send(true);
    }
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    /// True once shutdown has been requested.
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes when shutdown is requested (at once if it already was).
    pub async fn recv(&mut self) {
        // An error means the trigger was dropped: treat it as shutdown too.
        let _ = self.rx.wait_for(|v| *v).await;
    }

    /// The underlying receiver, for components that take a `watch::Receiver<bool>`.
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }
}
