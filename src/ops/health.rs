//! Fleet health messages: the appliance's retained status (online / offline, also its MQTT Last
//! Will) and the per-feed heartbeat with counts. Published by the forwarder (see
//! [`crate::forward::mqtt`] for topics and timing). No patient data: names, counts, times.

use serde::Serialize;

use crate::outbox::{FeedCounters, now_ms};

/// `<health_topic_prefix>/<site>/status`, retained.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// `online` or `offline`.
    pub state: &'static str,
    pub appliance: String,
    /// Why offline: `shutdown` (clean stop) or `connection lost` (the Last Will).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `MQTT 5` or `MQTT 3.1.1` (online only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub version: &'static str,
    /// When this status was produced (Unix ms). For the Last Will: when the connection that
    /// registered it was opened.
    pub at_ms: u64,
}

impl Status {
    pub fn online(appliance: &str, protocol: &str) -> Status {
        Status {
            state: "online",
            appliance: appliance.to_string(),
            reason: None,
            protocol: Some(protocol.to_string()),
            version: env!("CARGO_PKG_VERSION"),
            at_ms: now_ms(),
        }
    }

    pub fn offline(appliance: &str, reason: &str) -> Status {
        Status {
            state: "offline",
            appliance: appliance.to_string(),
            reason: Some(reason.to_string()),
            protocol: None,
            version: env!("CARGO_PKG_VERSION"),
            at_ms: now_ms(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `<health_topic_prefix>/<site>/<feed>/heartbeat`, retained.
#[derive(Clone, Debug, Serialize)]
pub struct FeedHeartbeat {
    pub appliance: String,
    pub feed: String,
    pub at_ms: u64,
    /// True once the feed has received nothing for longer than its quiet time.
    pub silent: bool,
    /// Seconds since the feed's last message (or since the daemon started, before the first).
    pub quiet_secs: u64,
    /// Records of this feed waiting for delivery now.
    pub pending: u64,
    /// Counts since the daemon started.
    #[serde(flatten)]
    pub counters: FeedCounters,
}

impl FeedHeartbeat {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_heartbeat_are_json_without_surprises() {
        let s: serde_json::Value =
            serde_json::from_slice(&Status::offline("edge-1", "shutdown").to_bytes())
                .expect("json");
        assert_eq!(s["state"], "offline");
        assert_eq!(s["reason"], "shutdown");
        assert!(s.get("protocol").is_none());
        let hb = FeedHeartbeat {
            appliance: "edge-1".into(),
            feed: "pas".into(),
            at_ms: 1,
            silent: true,
            quiet_secs: 5,
            pending: 2,
            counters: FeedCounters {
                received: 3,
                ..FeedCounters::default()
            },
        };
        let v: serde_json::Value = serde_json::from_slice(&hb.to_bytes()).expect("json");
        assert_eq!(v["received"], 3);
        assert_eq!(v["silent"], true);
        assert_eq!(v["pending"], 2);
    }
}
