//! One MQTT connection in either protocol version: rumqttc's MQTT 3.1.1 client (`rumqttc`) or
//! its MQTT 5 client (`rumqttc::v5`), behind one small surface so that the publisher's
//! correlation logic (see [`super::mqtt`]) is written once.
//!
//! Both rumqttc clients have the same event model (the 3.1.1 one is where the MQTT 5 one was
//! forked from): `Outgoing::Publish(pkid)` is queued in request order, PUBACK/PUBREC/PUBCOMP come
//! back as `Incoming` packets, a pkid collision is held in `state.collision`, and
//! `EventLoop::clean()` moves unacknowledged publishes to `pending` for a session resume. The
//! differences that matter here are normalised into [`Ev`]:
//!
//! * MQTT 5 acknowledgements carry a reason code. A PUBACK (QoS 1) or PUBREC (QoS 2) with a
//!   failure code is the broker *refusing* that message: [`Ev::Done`] with a [`Refusal`].
//!   MQTT 3.1.1 has no way to refuse a publish except closing the connection (and mosquitto
//!   acknowledges a publish it drops for size or ACL to a 3.1.1 client as if it had taken it).
//! * MQTT 5 CONNACK may announce the broker's maximum packet size; a Bundle that cannot fit is
//!   dead-lettered before it is sent (rumqttc would otherwise fail the whole connection on it,
//!   forever).

use std::time::Duration;

use rumqttc::v5 as v5c;
use rumqttc::v5::mqttbytes as p5m;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5 as p5;

/// Which protocol a connection speaks.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Version {
    V5,
    V311,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V5 => "MQTT 5",
            Version::V311 => "MQTT 3.1.1",
        })
    }
}

/// A broker's "no" to one publish (MQTT 5 only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The MQTT 5 reason code, e.g. 0x87.
    pub code: u8,
    /// Its name, e.g. `NotAuthorized`.
    pub name: &'static str,
    /// True when sending the same message again cannot succeed (dead-letter it); false for
    /// "try again later" (quota exceeded, packet id in use).
    pub permanent: bool,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:02x})", self.name, self.code)
    }
}

/// What the publisher needs to know about one event of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ev {
    /// Connected; the broker's maximum packet size when it announced one (MQTT 5).
    ConnAck {
        max_packet: Option<u32>,
    },
    /// The next submitted publish left with this packet id (0 for QoS 0).
    Sent(u16),
    /// The flow of this packet id is finished: PUBACK (QoS 1), PUBCOMP (QoS 2), or a refusing
    /// PUBACK/PUBREC (MQTT 5).
    Done {
        pkid: u16,
        refusal: Option<Refusal>,
    },
    /// Our DISCONNECT went out.
    Disconnected,
    Other,
}

/// A failed poll: the connection is gone.
#[derive(Debug)]
pub(crate) struct LinkError {
    /// Log-safe description (never packet content).
    pub text: String,
    /// The broker answered an MQTT 5 CONNECT in a way that says it does not speak MQTT 5.
    pub v5_unsupported: bool,
}

/// MQTT 5 publish metadata (ignored on 3.1.1).
#[derive(Clone, Debug, Default)]
pub(crate) struct PublishMeta {
    pub content_type: Option<&'static str>,
    pub user_properties: Vec<(String, String)>,
}

impl PublishMeta {
    /// Bytes these properties add to an MQTT 5 PUBLISH (upper bound).
    pub fn encoded_len(&self) -> usize {
        let mut n = 4 + 2; // property length varint + payload format indicator
        if let Some(ct) = self.content_type {
            n += 3 + ct.len();
        }
        for (k, v) in &self.user_properties {
            n += 5 + k.len() + v.len();
        }
        n
    }
}

pub(crate) enum Client {
    V311(rumqttc::AsyncClient),
    V5(v5c::AsyncClient),
}

pub(crate) enum Loop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<v5c::EventLoop>),
}

fn qos3(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        2 => rumqttc::QoS::ExactlyOnce,
        _ => rumqttc::QoS::AtLeastOnce,
    }
}

fn qos5(qos: u8) -> Q5 {
    match qos {
        0 => Q5::AtMostOnce,
        2 => Q5::ExactlyOnce,
        _ => Q5::AtLeastOnce,
    }
}

/// Everything needed to open a connection in either version.
#[derive(Clone)]
pub(crate) struct LinkOptions {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    pub max_inflight: u16,
    pub max_packet_bytes: usize,
    pub connect_timeout_secs: u64,
    pub credentials: Option<(String, String)>,
    pub tls: Option<rumqttc::TlsConfiguration>,
    /// (topic, payload) of the Last Will: retained, QoS 1.
    pub last_will: Option<(String, Vec<u8>)>,
}

impl LinkOptions {
    /// A new client and event loop speaking `version`. Always a clean session: the outbox, not
    /// the broker, is the source of truth for what is unacknowledged (see [`super::mqtt`]).
    pub fn open(&self, version: Version) -> (Client, Loop) {
        let cap = usize::from(self.max_inflight);
        match version {
            Version::V311 => {
                let host = self.host.trim_start_matches('[').trim_end_matches(']');
                let mut o = rumqttc::MqttOptions::new(self.client_id.clone(), host, self.port);
                o.set_keep_alive(self.keep_alive);
                o.set_clean_session(true);
                o.set_inflight(self.max_inflight);
                o.set_max_packet_size(64 * 1024, self.max_packet_bytes);
                o.set_request_channel_capacity(cap);
                if let Some((u, p)) = &self.credentials {
                    o.set_credentials(u.clone(), p.clone());
                }
                if let Some(tls) = &self.tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(tls.clone()));
                }
                if let Some((topic, payload)) = &self.last_will {
                    o.set_last_will(rumqttc::LastWill::new(
                        topic.clone(),
                        payload.clone(),
                        rumqttc::QoS::AtLeastOnce,
                        true,
                    ));
                }
                let (client, mut el) = rumqttc::AsyncClient::new(o, cap);
                let mut net = el.network_options();
                net.set_connection_timeout(self.connect_timeout_secs.max(1));
                el.set_network_options(net);
                (Client::V311(client), Loop::V311(Box::new(el)))
            }
            Version::V5 => {
                let host = self.host.trim_start_matches('[').trim_end_matches(']');
                let mut o = v5c::MqttOptions::new(self.client_id.clone(), host, self.port);
                o.set_keep_alive(self.keep_alive);
                o.set_clean_start(true);
                // Bounds rumqttc's per-pkid table (it would otherwise size it for 65535).
                o.set_outgoing_inflight_upper_limit(self.max_inflight);
                o.set_receive_maximum(Some(self.max_inflight));
                o.set_max_packet_size(Some(64 * 1024));
                o.set_request_channel_capacity(cap);
                o.set_connection_timeout(self.connect_timeout_secs.max(1));
                if let Some((u, p)) = &self.credentials {
                    o.set_credentials(u.clone(), p.clone());
                }
                if let Some(tls) = &self.tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(tls.clone()));
                }
                if let Some((topic, payload)) = &self.last_will {
                    o.set_last_will(p5::LastWill::new(
                        topic.clone(),
                        payload.clone(),
                        Q5::AtLeastOnce,
                        true,
                        None,
                    ));
                }
                let (client, el) = v5c::AsyncClient::new(o, cap);
                (Client::V5(client), Loop::V5(Box::new(el)))
            }
        }
    }
}

impl Client {
    /// Queues a publish without waiting; `false` when the request channel is full.
    pub fn try_publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Vec<u8>,
        meta: &PublishMeta,
    ) -> bool {
        match self {
            Client::V311(c) => c.try_publish(topic, qos3(qos), retain, payload).is_ok(),
            Client::V5(c) => {
                let props = p5::PublishProperties {
                    payload_format_indicator: Some(1),
                    content_type: meta.content_type.map(str::to_string),
                    user_properties: meta.user_properties.clone(),
                    ..Default::default()
                };
                c.try_publish_with_properties(topic, qos5(qos), retain, payload, props)
                    .is_ok()
            }
        }
    }

    pub fn try_disconnect(&self) -> bool {
        match self {
            Client::V311(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        }
    }
}

impl Loop {
    pub fn version(&self) -> Version {
        match self {
            Loop::V311(_) => Version::V311,
            Loop::V5(_) => Version::V5,
        }
    }

    /// Polls once. Never cancel this future (see [`super::mqtt`]).
    pub async fn poll(&mut self) -> Result<Ev, LinkError> {
        match self {
            Loop::V311(el) => el.poll().await.map(ev3).map_err(|e| err3(&e)),
            Loop::V5(el) => el.poll().await.map(ev5).map_err(|e| err5(&e)),
        }
    }

    /// Events rumqttc read before it failed (a PUBACK read is a PUBACK received).
    pub fn take_buffered(&mut self) -> Vec<Ev> {
        match self {
            Loop::V311(el) => el.state.events.drain(..).map(ev3).collect(),
            Loop::V5(el) => el.state.events.drain(..).map(ev5).collect(),
        }
    }

    /// Drops the connection and everything rumqttc would replay on its own: unacknowledged
    /// publishes, queued requests, a held collision, buffered events.
    pub fn reset(&mut self) {
        match self {
            Loop::V311(el) => {
                el.clean();
                el.pending.clear();
                el.state.events.clear();
                el.state.collision = None;
            }
            Loop::V5(el) => {
                el.clean();
                el.pending.clear();
                el.state.events.clear();
                el.state.collision = None;
            }
        }
    }

    /// True while rumqttc holds a publish back because its pkid is still in flight.
    pub fn has_collision(&self) -> bool {
        match self {
            Loop::V311(el) => el.state.collision.is_some(),
            Loop::V5(el) => el.state.collision.is_some(),
        }
    }
}

fn ev3(e: rumqttc::Event) -> Ev {
    use rumqttc::{Event, Incoming, Outgoing};
    match e {
        Event::Incoming(Incoming::ConnAck(_)) => Ev::ConnAck { max_packet: None },
        Event::Outgoing(Outgoing::Publish(pkid)) => Ev::Sent(pkid),
        Event::Incoming(Incoming::PubAck(a)) => Ev::Done {
            pkid: a.pkid,
            refusal: None,
        },
        Event::Incoming(Incoming::PubComp(c)) => Ev::Done {
            pkid: c.pkid,
            refusal: None,
        },
        Event::Outgoing(Outgoing::Disconnect) => Ev::Disconnected,
        _ => Ev::Other,
    }
}

fn ev5(e: v5c::Event) -> Ev {
    use rumqttc::Outgoing;
    use v5c::{Event, Incoming};
    match e {
        Event::Incoming(Incoming::ConnAck(c)) => Ev::ConnAck {
            max_packet: c.properties.and_then(|p| p.max_packet_size),
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => Ev::Sent(pkid),
        Event::Incoming(Incoming::PubAck(a)) => Ev::Done {
            pkid: a.pkid,
            refusal: puback_refusal(&a.reason),
        },
        Event::Incoming(Incoming::PubRec(r)) => match pubrec_refusal(&r.reason) {
            Some(refusal) => Ev::Done {
                pkid: r.pkid,
                refusal: Some(refusal),
            },
            None => Ev::Other,
        },
        Event::Incoming(Incoming::PubComp(c)) => Ev::Done {
            pkid: c.pkid,
            refusal: None,
        },
        Event::Outgoing(Outgoing::Disconnect) => Ev::Disconnected,
        _ => Ev::Other,
    }
}

fn refusal(code: u8, name: &'static str, permanent: bool) -> Option<Refusal> {
    Some(Refusal {
        code,
        name,
        permanent,
    })
}

fn puback_refusal(r: &p5::PubAckReason) -> Option<Refusal> {
    use p5::PubAckReason as R;
    match r {
        R::Success | R::NoMatchingSubscribers => None,
        R::UnspecifiedError => refusal(0x80, "UnspecifiedError", true),
        // mosquitto answers this for a payload beyond its message_size_limit.
        R::ImplementationSpecificError => refusal(0x83, "ImplementationSpecificError", true),
        R::NotAuthorized => refusal(0x87, "NotAuthorized", true),
        R::TopicNameInvalid => refusal(0x90, "TopicNameInvalid", true),
        R::PacketIdentifierInUse => refusal(0x91, "PacketIdentifierInUse", false),
        R::QuotaExceeded => refusal(0x97, "QuotaExceeded", false),
        R::PayloadFormatInvalid => refusal(0x99, "PayloadFormatInvalid", true),
    }
}

fn pubrec_refusal(r: &p5::PubRecReason) -> Option<Refusal> {
    use p5::PubRecReason as R;
    match r {
        R::Success | R::NoMatchingSubscribers => None,
        R::UnspecifiedError => refusal(0x80, "UnspecifiedError", true),
        R::ImplementationSpecificError => refusal(0x83, "ImplementationSpecificError", true),
        R::NotAuthorized => refusal(0x87, "NotAuthorized", true),
        R::TopicNameInvalid => refusal(0x90, "TopicNameInvalid", true),
        R::PacketIdentifierInUse => refusal(0x91, "PacketIdentifierInUse", false),
        R::QuotaExceeded => refusal(0x97, "QuotaExceeded", false),
        R::PayloadFormatInvalid => refusal(0x99, "PayloadFormatInvalid", true),
    }
}

const TLS_HINT: &str = "check mqtt.ca_file (the CA that signed the broker's certificate), that the \
                        certificate names the host in mqtt.url, and for mutual TLS \
                        mqtt.client_cert_file / client_key_file";

/// With TLS 1.3 a broker that refuses our client certificate (or its absence) says so with an
/// alert after the handshake, which surfaces as an I/O error: name the likely cause.
fn with_alert_hint(text: String) -> String {
    if text.contains("CertificateRequired")
        || text.contains("BadCertificate")
        || text.contains("UnknownCA")
        || text.contains("CertificateUnknown")
    {
        format!(
            "{text}; the broker refused the TLS session: it wants a client certificate it trusts \
             (check mqtt.client_cert_file / client_key_file, and that the broker trusts their CA)"
        )
    } else {
        text
    }
}

fn err3(e: &rumqttc::ConnectionError) -> LinkError {
    use rumqttc::{ConnectionError as E, StateError as S};
    let text = match e {
        E::MqttState(S::Deserialization(d)) => with_alert_hint(format!("MQTT protocol error: {d}")),
        E::MqttState(s) => with_alert_hint(format!("MQTT state error: {s}")),
        E::NotConnAck(_) => "broker sent another packet instead of CONNACK".into(),
        E::ConnectionRefused(code) => format!(
            "broker refused the connection ({code:?}); check mqtt.username/password/client_id"
        ),
        E::Tls(t) => format!("TLS handshake with the broker failed: {t}; {TLS_HINT}"),
        other => with_alert_hint(other.to_string()),
    };
    LinkError {
        text,
        v5_unsupported: false,
    }
}

fn err5(e: &v5c::ConnectionError) -> LinkError {
    use p5::ConnectReturnCode as C;
    use v5c::{ConnectionError as E, StateError as S};
    let mut v5_unsupported = false;
    let text = match e {
        E::MqttState(S::Deserialization(p5m::Error::Io(io))) => {
            with_alert_hint(format!("I/O: {io}"))
        }
        E::MqttState(S::Deserialization(d)) => {
            // A 3.1.1 broker answers an MQTT 5 CONNECT with a 3.1.1 CONNACK (return code 1),
            // which does not parse as MQTT 5.
            v5_unsupported = true;
            format!("MQTT protocol error: {d}")
        }
        E::MqttState(S::ConnectionAborted) => {
            // What rumqttc's MQTT 5 parser makes of a 3.1.1 broker's 2-byte CONNACK followed by
            // the broker closing the connection. Also what any broker closing before CONNACK
            // looks like: the caller tries 3.1.1 once and comes back to 5 if that fails too.
            v5_unsupported = true;
            "connection closed by the broker before CONNACK".into()
        }
        E::MqttState(s) => format!("MQTT state error: {s}"),
        E::NotConnAck(_) => {
            v5_unsupported = true;
            "broker sent another packet instead of CONNACK".into()
        }
        E::ConnectionRefused(
            code @ (C::UnsupportedProtocolVersion | C::RefusedProtocolVersion),
        ) => {
            v5_unsupported = true;
            format!("broker refused MQTT 5 ({code:?})")
        }
        E::ConnectionRefused(code) => format!(
            "broker refused the connection ({code:?}); check mqtt.username/password/client_id"
        ),
        E::Tls(t) => format!("TLS handshake with the broker failed: {t}; {TLS_HINT}"),
        other => with_alert_hint(other.to_string()),
    };
    LinkError {
        text,
        v5_unsupported,
    }
}

/// Polls the loop once, after an optional delay, and hands it back: the poll itself is never
/// cancelled (a cancelled poll can drop a publish rumqttc already counted as sent).
pub(crate) type PollFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = (Loop, Result<Ev, LinkError>)> + Send>>;

pub(crate) fn poll_once(mut lp: Loop, delay: Duration) -> PollFuture {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let res = lp.poll().await;
        (lp, res)
    })
}
