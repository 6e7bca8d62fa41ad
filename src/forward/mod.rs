//! MQTT forwarding (placeholder)
