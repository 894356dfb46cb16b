//! The initiator client (being written).
