//! The local busybox image and containers removed on drop.
