//! Forwarding: Ready Bundles from the outbox to the regional exchange over MQTT.
//!
//! # Topic scheme
//!
//! ```text
//! <prefix>/<site>/<feed>/<message type>        e.g.  hl7-edge/st-thomas/lab-results/ORU_R01
//! ```
//!
//! * `prefix` (config `mqtt.topic_prefix`, default `hl7-edge`) may itself span several levels
//!   (`region/hl7-edge`); empty levels in it are dropped.
//! * `site` (config `mqtt.site`, default the appliance id) names the appliance, `feed` the logical source feed,
//!   and the last level is MSH-9 as `TYPE_EVENT` (`ADT_A01`).
//! * Every level is sanitised by [`topic`]: the MQTT wildcards `+` and `#`, the separator `/`,
//!   NUL and other control characters become `_`; an empty level becomes `_`; a level starting
//!   with `$` (reserved for broker topics such as `$SYS`) gets its `$` replaced by `_`. A
//!   subscriber can therefore rely on exactly three levels after the prefix (site, feed, type),
//!   and no configured or received value can ever act as a wildcard or add a level.
//!
//! # Delivery guarantees
//!
//! QoS 1 (or 2), payload = the stored Bundle bytes as-is. A record becomes `Delivered` only when the
//! PUBACK for *its* publish arrives (see [`mqtt`] for how PUBACKs are matched to records).
//! Within a feed records are published in id order; feeds are pipelined independently. A
//! connection loss forgets everything in flight and republishes it from the store after the
//! reconnect: at-least-once, the exchange deduplicates on `Bundle.identifier`.

mod link;
pub mod mqtt;

pub use mqtt::{
    ForwardError, ForwardStatus, Forwarder, MqttConfig, MqttProtocol, health_topic, topic,
};
